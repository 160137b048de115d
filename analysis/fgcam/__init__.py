"""FG-CAM explanation engine (Qiu, Jin, Zhang, AAAI 2024, arXiv 2303.09171); see ``explainer``."""
from .explainer import FGCAM, LRP, FGCAMResult, denoise, require_feature_map
from .graph import UnsupportedOperation
from .ops import LowRule

__all__ = ["FGCAM", "LRP", "FGCAMResult", "LowRule", "UnsupportedOperation", "denoise", "require_feature_map"]
