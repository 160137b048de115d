"""Command-line front ends (`python -m analysis <command>`) whose method lives in a library module of
`analysis`: each module here has COMMAND, HELP, add_arguments(parser) and run(args) -> exit code."""
