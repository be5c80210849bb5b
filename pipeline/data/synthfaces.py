"""SynthFaces: a deterministic procedural generator of face-like 64x64 RGB identities.

The tiny world's stand-in for CelebA identities. An identity is `(seed, index)`: it fixes
continuous traits (face shape, skin tone, eye spacing/colour, nose, mouth, hair colour and
style) and CelebA-named binary attributes (`ATTRIBUTE_NAMES`), correlated like the real ones
(beard only if male, bangs rarer for men, grey hair only if old, ...). Each identity renders
any number of images `k = 0, 1, ...` that vary pose (shift/rotation/scale), lighting,
expression jitter and background while keeping the identity recognisable.

Seeds in use (identities with different seeds are disjoint; ids are `s{seed}_{index:06d}`):
  * seed 0      - the demo / LoRA-building identities (`w2w synth` default)
  * seed 1000   - base-model pretraining identities (jobs/pretrain_tiny.py)
  * seed 2000   - evaluator training identities (jobs/train_evaluators.py)
  * seed 3000   - evaluator held-out identities (reported accuracies, tests)

Rendering is vectorised numpy on a 64x64 grid with soft (anti-aliased) shape masks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

RESOLUTION = 64
ATTRIBUTE_NAMES = ("male", "beard", "eyeglasses", "bangs", "smiling", "young", "pale_skin")

SEED_DEMO = 0
SEED_PRETRAIN = 1000
SEED_EVAL_TRAIN = 2000
SEED_EVAL_HELDOUT = 3000

_SKIN = np.array(
    [[0.98, 0.84, 0.72], [0.93, 0.74, 0.60], [0.80, 0.60, 0.45], [0.62, 0.44, 0.31], [0.42, 0.28, 0.19]]
)
_PALE = np.array([0.99, 0.93, 0.89])
_HAIR = np.array(
    [[0.08, 0.06, 0.05], [0.30, 0.18, 0.09], [0.55, 0.36, 0.16], [0.85, 0.70, 0.38], [0.62, 0.22, 0.08]]
)
_GREY = np.array([0.78, 0.78, 0.80])
_IRIS = np.array([[0.30, 0.17, 0.07], [0.15, 0.35, 0.70], [0.20, 0.50, 0.25], [0.40, 0.42, 0.45]])
_GLASSES = np.array([[0.05, 0.05, 0.05], [0.55, 0.10, 0.10], [0.10, 0.15, 0.50]])
# How traits follow attributes. `sample_identity` draws with these and `with_attribute` re-applies them,
# so a flipped attribute changes exactly what the generator ties to it.
_MALE_SHIFT = {"face_w": 0.03, "jaw": 0.3, "brow_thick": 0.010}  # added when male
_HAIR_LONG = {0: (0.45, 0.75), 1: (-0.05, 0.15)}  # hair length range, by male
_LIP = {0: np.array([0.75, 0.25, 0.30]), 1: np.array([0.62, 0.36, 0.34])}  # lip colour, by male
_GREYING = 0.75  # old: hair = (1 - g) * own colour + g * grey


def identity_id(seed: int, index: int) -> str:
    return f"s{seed}_{index:06d}"


@dataclass
class Identity:
    seed: int
    index: int
    attributes: dict[str, int]
    traits: dict[str, object] = field(repr=False)

    @property
    def id(self) -> str:
        return identity_id(self.seed, self.index)


def sample_identity(seed: int, index: int) -> Identity:
    """The identity `(seed, index)`: deterministic traits and attributes."""
    rng = np.random.default_rng([int(seed), int(index), 0x5EED])
    male = int(rng.random() < 0.45)
    young = int(rng.random() < 0.75)
    beard = int(male and rng.random() < 0.40)
    eyeglasses = int(rng.random() < (0.12 if young else 0.25))
    bangs = int(rng.random() < (0.08 if male else 0.30))
    smiling = int(rng.random() < 0.50)
    pale_skin = int(rng.random() < 0.05)
    attributes = dict(
        male=male, beard=beard, eyeglasses=eyeglasses, bangs=bangs, smiling=smiling, young=young, pale_skin=pale_skin
    )
    # skin: interpolate the palette
    t = rng.uniform(0, len(_SKIN) - 1)
    lo = int(np.floor(t))
    hi = min(lo + 1, len(_SKIN) - 1)
    skin = skin_own = _SKIN[lo] * (1 - (t - lo)) + _SKIN[hi] * (t - lo)
    if pale_skin:
        skin = _PALE + rng.normal(0, 0.01, 3)
    hair = hair_own = _HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 0.03, 3)
    if not young:
        hair = (1 - _GREYING) * hair + _GREYING * _GREY
    traits = dict(
        face_w=rng.uniform(0.36, 0.46) + _MALE_SHIFT["face_w"] * male,
        face_h=rng.uniform(0.46, 0.56),
        jaw=rng.uniform(0.0, 0.2) + _MALE_SHIFT["jaw"] * male,  # squareness of the lower face
        skin=np.clip(skin, 0, 1),
        hair=np.clip(hair, 0, 1),
        hair_top=rng.uniform(0.06, 0.16),
        hair_long=rng.uniform(*_HAIR_LONG[male]),
        hair_part=rng.uniform(-0.15, 0.15),
        eye_dx=rng.uniform(0.13, 0.21),
        eye_y=rng.uniform(-0.10, 0.00),
        eye_r=rng.uniform(0.045, 0.065),
        iris=_IRIS[rng.integers(len(_IRIS))],
        brow_thick=rng.uniform(0.014, 0.022) + _MALE_SHIFT["brow_thick"] * male,
        brow_tilt=rng.uniform(-0.05, 0.05),
        nose_len=rng.uniform(0.08, 0.16),
        nose_w=rng.uniform(0.035, 0.06),
        mouth_y=rng.uniform(0.22, 0.30),
        mouth_w=rng.uniform(0.10, 0.16),
        lip=_LIP[male] + rng.normal(0, 0.04, 3),
        glasses=_GLASSES[rng.integers(len(_GLASSES))],
        glasses_round=int(rng.integers(2)),
        shirt=rng.uniform(0.1, 0.9, 3),
        cheek=rng.uniform(0.0, 1.0),
        hair_own=hair_own,  # before greying: what `with_attribute(..., "young", 1)` restores
        skin_own=np.clip(skin_own, 0, 1),  # the palette tone under pale skin
    )
    return Identity(seed=int(seed), index=int(index), attributes=attributes, traits=traits)


def can_have(attributes: Mapping[str, int], name: str, value: int) -> bool:
    """Whether SynthFaces draws a person with `attributes` and `name` set to `value`: it draws beards on
    men only. The rule every edit measurement shares (a perfect edit, and which models the report edits)."""
    return not (name == "beard" and value and not attributes.get("male", 1))


def with_attribute(identity: Identity, name: str, value: int) -> Identity:
    """The same person with one attribute set: what a perfect edit gives (the report's reference for edits).

    Traits the generator ties to the attribute follow it: hair greys with age, pale skin replaces
    the palette tone, and face width, jaw, brows, lip colour and hair length follow `male` (a
    beardless face when male is unset). Every other trait stays, so the identity stays itself."""
    if name not in ATTRIBUTE_NAMES:
        raise ValueError(f"unknown SynthFaces attribute {name!r}; valid: {', '.join(ATTRIBUTE_NAMES)}")
    attributes, traits = dict(identity.attributes), dict(identity.traits)
    old, new = attributes[name], int(bool(value))
    attributes[name] = new
    if not can_have(attributes, name, new):
        raise ValueError("SynthFaces draws beards on male identities only: set male first")
    if name == "young":
        own = traits["hair_own"]
        traits["hair"] = np.clip(own if new else (1 - _GREYING) * own + _GREYING * _GREY, 0, 1)
    if name == "pale_skin":
        traits["skin"] = _PALE if new else traits["skin_own"]
    if name == "male" and new != old:
        for key, shift in _MALE_SHIFT.items():
            traits[key] = traits[key] + shift * (new - old)
        (lo0, hi0), (lo1, hi1) = _HAIR_LONG[old], _HAIR_LONG[new]
        traits["hair_long"] = lo1 + (traits["hair_long"] - lo0) * (hi1 - lo1) / (hi0 - lo0)
        traits["lip"] = traits["lip"] + _LIP[new] - _LIP[old]
        if not new:
            attributes["beard"] = 0
    return Identity(seed=identity.seed, index=identity.index, attributes=attributes, traits=traits)


# Caption phrases for the traits identities differ in (the base model's pretraining captions name
# them, so the model learns to draw each one distinctly; docs/TINY_WORLD.md). Palette order.
HAIR_WORDS = ("black", "brown", "chestnut", "blonde", "ginger")
SKIN_WORDS = ("fair", "light", "olive", "tan", "dark")
IRIS_WORDS = ("brown", "blue", "green", "grey")


def _nearest(palette: np.ndarray, colour: np.ndarray) -> int:
    return int(np.argmin(((palette - np.asarray(colour)[None]) ** 2).sum(1)))


def trait_phrases(identity: Identity) -> list[str]:
    """Hair (length and colour), eye colour and skin tone as short phrases, e.g. "long blonde hair"."""
    t, a = identity.traits, identity.attributes
    length = "long" if t["hair_long"] > 0.3 else "short"
    hair = "grey" if not a["young"] else HAIR_WORDS[_nearest(_HAIR, t["hair"])]
    skin = "pale" if a["pale_skin"] else SKIN_WORDS[_nearest(_SKIN, t["skin"])]
    return [f"{length} {hair} hair", f"{IRIS_WORDS[_nearest(_IRIS, t['iris'])]} eyes", f"{skin} skin"]


# ----------------------------------------------------------------------------- rendering
_LIN = (np.arange(RESOLUTION) + 0.5) / RESOLUTION * 2 - 1
_GY, _GX = np.meshgrid(_LIN, _LIN, indexing="ij")
_PX = 2.0 / RESOLUTION  # one pixel in normalised units


def _soft(d: np.ndarray, width: float = 0.7) -> np.ndarray:
    """Signed distance (normalised units, <0 inside) -> anti-aliased coverage in [0, 1]."""
    return np.clip(0.5 - d / (_PX * width * 2), 0.0, 1.0)


def _ellipse(x, y, cx, cy, a, b):
    return (np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2) - 1.0) * min(a, b)


def _blend(img, mask, color):
    m = mask[..., None]
    img *= 1 - m
    img += m * np.asarray(color)[None, None, :]


def render(identity: Identity, k: int) -> np.ndarray:
    """Image `k` of an identity: uint8 (64, 64, 3)."""
    tr = identity.traits
    at = identity.attributes
    rng = np.random.default_rng([identity.seed, identity.index, int(k), 0x1A6E])
    # pose: the canonical coordinates each output pixel looks at
    angle = rng.normal(0, 0.07)
    scale = rng.uniform(0.92, 1.08)
    sx, sy = rng.normal(0, 0.045, 2)
    c, s = np.cos(angle), np.sin(angle)
    px, py = (_GX - sx) / scale, (_GY - sy) / scale
    x = (c * px + s * py) * 0.78
    y = (-s * px + c * py) * 0.78 - 0.04

    # background: a random colour with a vertical gradient
    bg0 = rng.uniform(0.25, 0.85, 3)
    bg1 = np.clip(bg0 + rng.normal(0, 0.15, 3), 0, 1)
    tt = ((_GY + 1) / 2)[..., None]
    img = bg0[None, None] * (1 - tt) + bg1[None, None] * tt

    fw, fh = tr["face_w"], tr["face_h"]
    skin, hair = tr["skin"], tr["hair"]
    # long hair behind the head
    if tr["hair_long"] > 0.05:
        back = np.maximum(_ellipse(x, y, 0, -0.08, fw + 0.10, fh + 0.10), y - (0.05 + tr["hair_long"]))
        _blend(img, _soft(back), hair * 0.9)
    # shirt + neck
    _blend(img, _soft(np.maximum(_ellipse(x, y, 0, 1.15, 0.85, 0.45), -y + 0.55)), tr["shirt"])
    neck = np.maximum(np.abs(x) - fw * 0.45, np.maximum(y - 0.85, -y + 0.2))
    _blend(img, _soft(neck), skin * 0.85)
    # face: an ellipse whose lower half is squared by `jaw`
    ex = np.where(y > 0, 2.0 + 2.0 * tr["jaw"], 2.0)
    r = (np.abs(x / fw) ** ex + np.abs(y / fh) ** 2) ** (1 / 2)
    face_d = (r - 1.0) * min(fw, fh)
    face = _soft(face_d)
    # ears
    for side in (-1, 1):
        _blend(img, _soft(_ellipse(x, y, side * fw, -0.02, 0.05, 0.09)), skin * 0.92)
    _blend(img, face, skin)
    # cheek blush / shading
    shade = np.exp(-((np.abs(x) - fw * 0.55) ** 2 + (y - 0.12) ** 2) / 0.01) * face * 0.08 * tr["cheek"]
    img += shade[..., None] * np.array([0.3, -0.2, -0.2])[None, None]
    # old: wrinkles on the forehead and under the eyes
    if not at["young"]:
        for wy in (-0.30, -0.25, -0.20):
            d = np.maximum(np.abs(y - wy - 0.03 * (x / fw) ** 2) - 0.006, np.abs(x) - fw * 0.5)
            _blend(img, _soft(d, 0.5) * face, skin * 0.55)
        for side in (-1, 1):
            d = np.maximum(np.abs(y - (tr["eye_y"] + 0.085)) - 0.006, np.abs(x - side * tr["eye_dx"]) - 0.05)
            _blend(img, _soft(d, 0.5) * face, skin * 0.6)
    # beard: the lower face in hair colour (dark when hair is light but young)
    if at["beard"]:
        bcol = hair if np.mean(hair) < 0.5 else hair * 0.6
        beard = np.maximum(face_d, -(y - (tr["mouth_y"] - 0.09 + 0.06 * np.abs(x / fw) ** 2)))
        _blend(img, _soft(beard) * 0.92, bcol)
    # mouth: a curve; smiling bends it up and opens it a little
    smile = at["smiling"]
    curve = (0.55 if smile else 0.02) + rng.normal(0, 0.06)
    mw = tr["mouth_w"] * (1.15 if smile else 1.0)
    mx = x / mw
    my = tr["mouth_y"] - 0.03 * curve + curve * 0.06 * (1 - mx**2)
    thick = 0.018 + (0.016 if smile else 0.0)
    mouth = np.maximum(np.abs(y - my - (thick * 0.4 if smile else 0)) - thick * (1 - 0.6 * mx**2), np.abs(x) - mw)
    _blend(img, _soft(mouth), tr["lip"])
    if smile:
        teeth = np.maximum(np.abs(y - my - thick * 0.25) - thick * 0.35 * (1 - mx**2), np.abs(x) - mw * 0.7)
        _blend(img, _soft(teeth), np.array([0.97, 0.95, 0.9]))
    # nose
    nose = _ellipse(x, y, 0, tr["eye_y"] + 0.06 + tr["nose_len"] / 2, tr["nose_w"], tr["nose_len"] / 2 + 0.01)
    _blend(img, _soft(nose) * 0.5, skin * 0.72)
    # eyes (expression jitter: openness)
    open_ = np.clip(rng.normal(1.0, 0.12), 0.6, 1.25) * (0.8 if smile else 1.0)
    er = tr["eye_r"]
    for side in (-1, 1):
        cx = side * tr["eye_dx"]
        cy = tr["eye_y"]
        white = _ellipse(x, y, cx, cy, er * 1.5, er * 0.85 * open_)
        _blend(img, _soft(white), np.array([0.96, 0.96, 0.96]))
        iris = np.maximum(_ellipse(x, y, cx + rng.normal(0, 0.004), cy, er * 0.75, er * 0.75), white)
        _blend(img, _soft(iris), tr["iris"])
        pupil = np.maximum(_ellipse(x, y, cx, cy, er * 0.33, er * 0.33), white)
        _blend(img, _soft(pupil), np.array([0.02, 0.02, 0.02]))
        # eyebrow
        by = cy - er * 1.9 - 0.02 + side * tr["brow_tilt"] * (x - cx)
        brow = np.maximum(np.abs(y - by - 0.15 * (x - cx) ** 2 / er) - tr["brow_thick"], np.abs(x - cx) - er * 1.8)
        _blend(img, _soft(brow), hair * 0.8 if np.mean(hair) < 0.6 else hair * 0.55)
    # hair on top of the head: the part of an enlarged ellipse above the hairline
    hairline = -fh * 0.70 + 0.035 * np.cos(3 * (x - tr["hair_part"]))
    top = np.maximum(_ellipse(x, y, 0, -0.04, fw + 0.06, fh + tr["hair_top"]), y - hairline)
    if tr["hair_long"] > 0.05:  # hair falling along the sides of the face
        sides = np.maximum(np.maximum(_ellipse(x, y, 0, -0.04, fw + 0.07, fh + tr["hair_top"]), -(np.abs(x) - fw * 0.82)), y - (0.05 + tr["hair_long"]))
        top = np.minimum(top, sides)
    _blend(img, _soft(top), hair)
    # bangs: hair over the forehead down to just above the eyebrows
    if at["bangs"]:
        fringe_y = tr["eye_y"] - er * 1.9 - 0.05 + 0.015 * np.sin(18 * x)
        bang = np.maximum(_ellipse(x, y, 0, -0.04, fw + 0.05, fh + tr["hair_top"]), y - fringe_y)
        _blend(img, _soft(bang), hair * 0.95)
    # eyeglasses: two frames + a bridge
    if at["eyeglasses"]:
        gcol = tr["glasses"]
        for side in (-1, 1):
            cx, cy = side * tr["eye_dx"], tr["eye_y"]
            if tr["glasses_round"]:
                ring = np.abs(_ellipse(x, y, cx, cy, er * 2.2, er * 2.0)) - 0.014
            else:
                q = np.maximum(np.abs(x - cx) - er * 2.2, np.abs(y - cy) - er * 1.7)
                ring = np.abs(q) - 0.014
            _blend(img, _soft(ring), gcol)
            _blend(img, _soft(_ellipse(x, y, cx, cy, er * 2.2, er * 1.9)) * 0.12, np.array([0.8, 0.9, 1.0]))
        bridge = np.maximum(np.abs(y - tr["eye_y"] + 0.01) - 0.012, np.abs(x) - (tr["eye_dx"] - er * 2.1))
        _blend(img, _soft(bridge), gcol)
        for side in (-1, 1):
            arm = np.maximum(np.abs(y - tr["eye_y"] + 0.01) - 0.011,
                             np.abs(x - side * (tr["eye_dx"] + er * 2.2 + fw) / 2 - side * 0.0) - max(0.0, (fw - tr["eye_dx"] - er * 2.2) / 2))
            _blend(img, _soft(arm), gcol)
    # lighting: global gain + a directional ramp + slight colour cast
    gain = rng.uniform(0.85, 1.12)
    lx, ly = rng.normal(0, 0.12, 2)
    ramp = 1.0 + lx * _GX + ly * _GY
    cast = 1.0 + rng.normal(0, 0.03, 3)
    img = img * (gain * ramp)[..., None] * cast[None, None]
    img += rng.normal(0, 0.012, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_identity(seed: int, index: int, n: int, start: int = 0) -> np.ndarray:
    ident = sample_identity(seed, index)
    return np.stack([render(ident, k) for k in range(start, start + n)])


def to_tensor(images: np.ndarray):
    """uint8 (N, H, W, 3) -> float tensor (N, 3, H, W) in [-1, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def write_identity_source(
    out_dir: str | Path,
    n_identities: int,
    images_per_identity: int,
    seed: int = SEED_DEMO,
    start_index: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `<out>/<identity_id>/<k>.png` and `<out>/attributes.parquet` (identity + int8 attrs).

    The layout a user provides real data in; load it with `pipeline.data.source.IdentitySource`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"identity": [], **{a: [] for a in ATTRIBUTE_NAMES}}
    for i in range(n_identities):
        ident = sample_identity(seed, start_index + i)
        folder = out / ident.id
        folder.mkdir(exist_ok=True)
        width = max(1, len(str(images_per_identity - 1)))
        for k in range(images_per_identity):
            Image.fromarray(render(ident, k)).save(folder / f"{k:0{width}d}.png", compress_level=1)
        rows["identity"].append(ident.id)
        for a in ATTRIBUTE_NAMES:
            rows[a].append(ident.attributes[a])
        if progress is not None:
            progress(i + 1, n_identities)
    table = pa.table(
        {"identity": pa.array(rows["identity"], pa.string()),
         **{a: pa.array(rows[a], pa.int8()) for a in ATTRIBUTE_NAMES}}
    )
    pq.write_table(table, out / "attributes.parquet")
    return out
