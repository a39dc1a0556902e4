"""Label tables of the HR-VITON test script.

Parse maps hold CIHP labels 0..19. The loader merges them into 13 channels; the image generator's
SPADE label map merges those 13 further into 7.
"""

CIHP_LABELS: tuple[str, ...] = (
    "background", "hat", "hair", "glove", "sunglasses", "upper_clothes", "dress", "coat", "socks",
    "pants", "torso_skin", "scarf", "skirt", "face", "left_arm", "right_arm", "left_leg", "right_leg",
    "left_shoe", "right_shoe",
)  # fmt: skip
NUM_CIHP_LABELS = len(CIHP_LABELS)

# 13-channel index -> (name, CIHP labels merged into it)
PARSE_13: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("background", (0, 10)),
    ("hair", (1, 2)),
    ("face", (4, 13)),
    ("upper", (5, 6, 7)),
    ("bottom", (9, 12)),
    ("left_arm", (14,)),
    ("right_arm", (15,)),
    ("left_leg", (16,)),
    ("right_leg", (17,)),
    ("left_shoe", (18,)),
    ("right_shoe", (19,)),
    ("socks", (8,)),
    ("noise", (3, 11)),
)

# 7-channel index -> (name, 13-channel indices merged into it)
PARSE_7: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("background", (0,)),
    ("paste", (2, 4, 7, 8, 9, 10, 11)),
    ("upper", (3,)),
    ("hair", (1,)),
    ("left_arm", (5,)),
    ("right_arm", (6,)),
    ("noise", (12,)),
)

# 13-channel indices whose probability is removed from the warped cloth mask (occlusion handling):
# everything but background, upper and bottom.
OCCLUDER_13: tuple[int, ...] = (1, 2, 5, 6, 7, 8, 9, 10, 11, 12)


def merge_matrix(groups: tuple[tuple[str, tuple[int, ...]], ...], num_sources: int) -> list[list[float]]:
    """0/1 matrix [len(groups), num_sources]: row i sums the sources of group i."""
    return [[1.0 if s in sources else 0.0 for s in range(num_sources)] for _, sources in groups]
