"""Every command line (`python -m analysis <command>`), thin over the library in the other packages: each
module here has COMMAND, HELP, add_arguments(parser) and run(args) -> exit code; analysis/__main__.py lists them."""
