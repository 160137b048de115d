"""FG-CAM explanation engine (Qiu, Jin, Zhang, AAAI 2024, arXiv 2303.09171); see ``explainer``."""
from .explainer import FGCAM, LRP, FGCAMResult, denoise, require_feature_map
from .graph import UnsupportedOperation
from .ops import LOW_RULE_FORMAT, LowRule, low_rule_text, parse_low_rule

__all__ = ["FGCAM", "LOW_RULE_FORMAT", "LRP", "FGCAMResult", "LowRule", "UnsupportedOperation", "denoise",
           "low_rule_text", "parse_low_rule", "require_feature_map"]
