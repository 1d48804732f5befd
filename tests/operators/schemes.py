"""Named level schemes used across the operator tests (each de-coalesces a 2-unit, 2-layer model)."""

from mlmega.operators import LevelSchemes

SCHEMES = {
    "width-stacked": LevelSchemes.from_factors(width_factor=2, width_kind="stacked"),
    "width-adjacent": LevelSchemes.from_factors(width_factor=2, width_kind="adjacent"),
    "width-custom3": LevelSchemes.from_dict({"width": [[0, 3, 4], [5, 1, 2]]}, "custom3"),
    "width-custom4": LevelSchemes.from_dict({"width": {"groups": [[0, 5, 2, 7], [4, 1, 6, 3]]}},
                                            "custom4"),
    "depth-adjacent": LevelSchemes.from_factors(depth_factor=2, depth_kind="adjacent"),
    "depth-stacked": LevelSchemes.from_factors(depth_factor=2, depth_kind="stacked"),
    "depth-custom3": LevelSchemes.from_dict({"depth": [[0, 4, 5], [1, 2, 3]]}, "depth3"),
    "both-stacked-adjacent": LevelSchemes.from_factors(width_factor=2, depth_factor=2),
    "both-adjacent-stacked": LevelSchemes.from_factors(2, 2, width_kind="adjacent",
                                                       depth_kind="stacked"),
    "both-preserving": LevelSchemes.from_dict({"width": {"kind": "stacked", "factor": 2},
                                               "depth": {"kind": "adjacent", "factor": 2},
                                               "preserve_function": True}, "preserving"),
    "depth3-preserving": LevelSchemes.from_dict({"depth": [[0, 4, 5], [1, 2, 3]],
                                                 "preserve_function": True}, "preserving3"),
}
# (width multiplier, depth multiplier) from the 2-unit, 2-layer small model to the large one
SCALE = {"width-stacked": (2, 1), "width-adjacent": (2, 1), "width-custom3": (3, 1),
         "width-custom4": (4, 1), "depth-adjacent": (1, 2), "depth-stacked": (1, 2),
         "depth-custom3": (1, 3), "both-stacked-adjacent": (2, 2), "both-adjacent-stacked": (2, 2),
         "both-preserving": (2, 2), "depth3-preserving": (1, 3)}
WIDTH = {name: SCHEMES[name] for name in ("width-stacked", "width-adjacent", "width-custom3")}
