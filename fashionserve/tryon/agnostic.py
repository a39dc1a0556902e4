"""Cloth-agnostic person inputs of HR-VITON: the agnostic person image and the parse-agnostic map.

Both follow the official code (cp_dataset_test.py `get_agnostic` and get_parse_agnostic.py): the same
PIL ImageDraw shapes, sizes and order, so results match the official ones pixel for pixel at
1024x768. Paste-backs are done with numpy boolean masks, which is exact because every mask the
official code pastes through is 0/255.
"""

import numpy as np
from PIL import Image, ImageDraw

GRAY = (128, 128, 128)  # PIL's colour name 'gray', the official fill

# BODY_25 keypoint indices used below
NECK, R_SHOULDER, R_ELBOW, R_WRIST, L_SHOULDER, L_ELBOW, L_WRIST, R_HIP, L_HIP = 1, 2, 3, 4, 5, 6, 7, 9, 12

# CIHP labels
UPPER_LABELS = (5, 6, 7)  # upper-clothes, dress, coat
NECK_LABEL = 10  # torso-skin
LEFT_ARM, RIGHT_ARM = 14, 15
HEAD_LABELS = (4, 13)  # sunglasses, face
LOWER_LABELS = (9, 12, 16, 17, 18, 19)  # pants, skirt, legs, shoes

# Reference width of the official parse-agnostic constants (get_parse_agnostic.py runs at 1024x768).
PARSE_AGNOSTIC_REF_WIDTH = 768


def _check_inputs(parse: np.ndarray, keypoints: np.ndarray, image: np.ndarray | None = None) -> None:
    if parse.ndim != 2 or parse.dtype != np.uint8:
        raise ValueError(f"parse must be a (H, W) uint8 label map, got {parse.shape} {parse.dtype}")
    if image is not None and (image.shape != (*parse.shape, 3) or image.dtype != np.uint8):
        raise ValueError(f"image must be (H, W, 3) uint8 with parse's size {parse.shape}, got {image.shape}")
    if keypoints.shape != (25, 2):
        raise ValueError(f"keypoints must be BODY_25 (25, 2) x,y, got {keypoints.shape}")


def _missing(point: np.ndarray) -> bool:
    """OpenPose writes undetected joints as (0, 0)."""
    return point[0] == 0.0 and point[1] == 0.0


def _xy(point: np.ndarray) -> tuple[float, float]:
    return float(point[0]), float(point[1])


def _box(point: np.ndarray, rx: float, ry: float) -> tuple[float, float, float, float]:
    """Bounding box of an ellipse centred on point with half-axes rx, ry."""
    x, y = _xy(point)
    return x - rx, y - ry, x + rx, y + ry


def agnostic_person_image(image: np.ndarray, parse: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """Person image with the upper garment, neck and arms covered in gray, as the official loader draws it.

    image: (H, W, 3) uint8 RGB; parse: (H, W) uint8 CIHP labels; keypoints: (25, 2) BODY_25 x, y in
    pixels, (0, 0) for undetected joints. Returns a new (H, W, 3) uint8 image.
    """
    _check_inputs(parse, keypoints, image)
    pose = np.array(keypoints, dtype=np.float64)  # own copy: the hips are moved below

    # Hips are spread about their midpoint to shoulder width so the torso mask covers loose garments.
    shoulder_width = np.linalg.norm(pose[L_SHOULDER] - pose[R_SHOULDER])
    hip_width = np.linalg.norm(pose[L_HIP] - pose[R_HIP])
    # The official divides by hip_width unguarded; coinciding hips would make NaN coordinates.
    if hip_width > 0:
        mid = (pose[R_HIP] + pose[L_HIP]) / 2
        for hip in (R_HIP, L_HIP):
            pose[hip] = mid + (pose[hip] - mid) / hip_width * shoulder_width
    r = int(shoulder_width / 16) + 1

    out = Image.fromarray(image)
    draw = ImageDraw.Draw(out)
    # torso
    for hip in (R_HIP, L_HIP):
        draw.ellipse(_box(pose[hip], r * 3, r * 6), GRAY, GRAY)
    draw.line([_xy(pose[R_SHOULDER]), _xy(pose[R_HIP])], GRAY, width=r * 6)
    draw.line([_xy(pose[L_SHOULDER]), _xy(pose[L_HIP])], GRAY, width=r * 6)
    draw.line([_xy(pose[R_HIP]), _xy(pose[L_HIP])], GRAY, width=r * 12)
    draw.polygon([_xy(pose[i]) for i in (R_SHOULDER, L_SHOULDER, L_HIP, R_HIP)], GRAY, GRAY)
    # neck: a box from the neck joint up to 9r above it
    x, y = _xy(pose[NECK])
    draw.rectangle((x - r * 5, y - r * 9, x + r * 5, y), GRAY, GRAY)
    # arms
    draw.line([_xy(pose[R_SHOULDER]), _xy(pose[L_SHOULDER])], GRAY, width=r * 12)
    for shoulder in (R_SHOULDER, L_SHOULDER):
        draw.ellipse(_box(pose[shoulder], r * 5, r * 6), GRAY, GRAY)
    for joint in (R_ELBOW, R_WRIST, L_ELBOW, L_WRIST):
        if _missing(pose[joint - 1]) or _missing(pose[joint]):
            continue
        draw.line([_xy(pose[joint - 1]), _xy(pose[joint])], GRAY, width=r * 10)
        draw.ellipse(_box(pose[joint], r * 5, r * 5), GRAY, GRAY)
    result = np.array(out)

    # Arm pixels away from the arm's own skeleton (e.g. a hand resting on the hip) are restored.
    height, width = parse.shape
    for label, chain in (
        (LEFT_ARM, (L_SHOULDER, L_ELBOW, L_WRIST)),
        (RIGHT_ARM, (R_SHOULDER, R_ELBOW, R_WRIST)),
    ):
        # The official canvas is a fixed 768x1024; the image's own size is identical at 1024x768 and
        # lets other resolutions work.
        skeleton = Image.new("L", (width, height), 0)
        skeleton_draw = ImageDraw.Draw(skeleton)
        end = pose[chain[0]]
        skeleton_draw.ellipse(_box(end, r * 5, r * 6), 255, 255)
        for joint in chain[1:]:
            if _missing(pose[joint - 1]) or _missing(pose[joint]):
                continue
            skeleton_draw.line([_xy(pose[joint - 1]), _xy(pose[joint])], 255, width=r * 10)
            end = pose[joint]
            if joint != chain[-1]:
                skeleton_draw.ellipse(_box(end, r * 5, r * 5), 255, 255)
        # the official closes the chain with a smaller circle at the last joint it reached
        skeleton_draw.ellipse(_box(end, r * 4, r * 4), 255, 255)
        restore = (parse == label) & (np.array(skeleton) == 0)
        result[restore] = image[restore]

    keep = np.isin(parse, HEAD_LABELS + LOWER_LABELS)
    result[keep] = image[keep]
    return result


def parse_agnostic_map(parse: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """Parse map without upper garment, neck and the arm parts near the arm skeleton (get_parse_agnostic.py).

    parse: (H, W) uint8 CIHP labels; keypoints: (25, 2) BODY_25 x, y, (0, 0) for undetected joints.
    Arm masks are lines 100 px wide between consecutive joints (the shoulder line included) with
    circles of radius 150 px at each joint and 40 px at the wrist. These are the official constants
    for 1024x768 and are used unchanged at width 768; at other sizes they scale with width / 768 so
    the mask covers the same part of the body. Labels 5, 6, 7 (upper) and 10 (neck) become 0.
    Returns a new (H, W) uint8 map.
    """
    _check_inputs(parse, keypoints)
    pose = np.asarray(keypoints, dtype=np.float64)
    scale = parse.shape[1] / PARSE_AGNOSTIC_REF_WIDTH
    line_width = max(1, round(100 * scale))
    joint_radius, wrist_radius = 150 * scale, 40 * scale

    out = parse.copy()
    height, width = parse.shape
    for label, chain in (
        (LEFT_ARM, (R_SHOULDER, L_SHOULDER, L_ELBOW, L_WRIST)),
        (RIGHT_ARM, (L_SHOULDER, R_SHOULDER, R_ELBOW, R_WRIST)),
    ):
        mask = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(mask)
        prev = chain[0]
        for joint in chain[1:]:
            # As in the official script, a missing joint is skipped without advancing prev, so the
            # next line bridges the gap.
            if _missing(pose[prev]) or _missing(pose[joint]):
                continue
            draw.line([_xy(pose[prev]), _xy(pose[joint])], 255, width=line_width)
            radius = wrist_radius if joint == chain[-1] else joint_radius
            draw.ellipse(_box(pose[joint], radius, radius), 255, 255)
            prev = joint
        out[(parse == label) & (np.array(mask) > 0)] = 0

    out[np.isin(parse, UPPER_LABELS + (NECK_LABEL,))] = 0
    return out
