"""`w2w serve`: an interactive explorer of a weight space in the browser (Gradio).

Tabs: Sample (seeds -> new identities), Edit (one slider per attribute direction, in calibrated
sigmas; ID similarity to the unedited model and the attribute classifier's scores where the
space has evaluators), Invert (an uploaded image -> a model of that identity), Nearest (the
closest training identities) and Download (the current model as a LoRA and as PC coefficients).

Two layers:
- `Explorer` holds the space, the frozen base model and the evaluators; every method is plain
  Python (no Gradio), renders under one lock (the LoRA slot writes into the shared UNet), and
  takes the caller's model vector as an argument: it keeps no per-user state.
- `build_app(explorer)` lays out the page. Each browser session's current model lives in a
  `gr.State` (never a module global), so a second tab never changes the first one's model.

Gradio is imported only inside `build_app`/`serve`: the core install works without the `ui`
extra (`pip install ".[ui]"`).
"""
import functools
import os
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

DEFAULT_PROMPT = "sks person"
INVERT_PROMPTS = ("sks person", "sks person, eyeglasses", "sks person, old")
# Uploads: images only, decoded by PIL after `verify()`; bigger files are refused by the server
# before any handler runs (launch's max_file_size), bigger images by `check_upload`.
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
SLIDER_RANGE = 3.0  # calibrated sigmas, -3..+3
DISPLAY_SIZE = 256  # renders are shown upscaled (nearest neighbour) to this many pixels


class UploadError(ValueError):
    """An uploaded file is not an acceptable image; the message says why (shown in the page)."""


def check_upload(path, max_pixels: int = MAX_UPLOAD_PIXELS) -> Image.Image:
    """Open an uploaded file as an RGB image, or raise UploadError.

    Only the formats in UPLOAD_FORMATS pass; `verify()` checks the file's structure before any
    pixel is decoded, and the pixel count is read from the header, so a decompression bomb is
    refused before it is decoded. Nothing from an upload is executed or unpickled.
    """
    if path is None:
        raise UploadError("no image uploaded")
    path = Path(path)
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise UploadError(f"{path.name} is {path.stat().st_size / 2**20:.1f} MiB; the limit is {MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        with Image.open(path) as probe:
            kind, (w, h) = probe.format, probe.size
            probe.verify()
    except Exception as err:  # noqa: BLE001 - any decoder failure means "not an image we accept"
        raise UploadError(f"{path.name} is not a readable image ({type(err).__name__}: {err}); upload a PNG or JPEG") from None
    if kind not in UPLOAD_FORMATS:
        raise UploadError(f"{path.name} is a {kind} file; accepted formats: {', '.join(UPLOAD_FORMATS)}")
    if w * h > max_pixels:
        raise UploadError(f"{path.name} is {w}x{h} pixels; the limit is {max_pixels:,} pixels")
    with Image.open(path) as image:
        return image.convert("RGB")


@dataclass
class Model:
    """A browser session's current model: the unedited vector (D,), a label, and the renders of it
    already made (keyed by prompt, seed), so an edit renders only the edited model."""

    vector: torch.Tensor
    label: str
    renders: dict = field(default_factory=dict)


class Explorer:
    """The space, its base model and (optional) evaluators, shared by every browser session."""

    def __init__(self, space, base=None, evaluators=None, render_steps: int = 25, render_seed: int = 0,
                 workdir: str | os.PathLike | None = None):
        from pipeline.eval.report import Renderer

        self.space = space
        self.base = base if base is not None else space.base_model()
        self.evaluators = evaluators
        self.render_seed = int(render_seed)
        self.lock = threading.Lock()  # one UNet: one render or inversion at a time
        self.renderer = Renderer(self.base, space.layout, int(render_steps))
        self._tmp = tempfile.TemporaryDirectory(prefix="w2w-serve-") if workdir is None else None
        self.workdir = Path(workdir) if workdir is not None else Path(self._tmp.name)

    @property
    def default_preset(self) -> str:
        """"out" (lr 1.0) on the tiny world, whose coefficients spread 20-40 per PC, too far for the published
        in-distribution lr of 0.1 in a few hundred steps (see pipeline.eval.report.ReportSettings.invert_lr)."""
        return "out" if self.space.model_config().path == "builtin:tiny" else "in"

    @property
    def attributes(self) -> list[str]:
        return sorted(self.space.directions)

    # ------------------------------------------------------------------ models
    def sample(self, seed: int) -> Model:
        return Model(self.space.sample(1, seed=int(seed))[0], f"sample seed {int(seed)}")

    def edited(self, model: Model, strengths: dict[str, float]) -> torch.Tensor:
        """The current model: the unedited vector plus the slider edits (zero sliders are no edit)."""
        edits = {name: float(s) for name, s in strengths.items() if float(s) != 0.0}
        return self.space.edit(model.vector, edits) if edits else model.vector

    # ------------------------------------------------------------------ renders
    def render(self, vectors: list[torch.Tensor], prompts: list[str]) -> torch.Tensor:
        """(len(vectors) * len(prompts), 3, H, W) in [-1, 1]: every vector in every prompt, same noise."""
        with self.lock:
            images = self.renderer.many(list(vectors), list(prompts), [self.render_seed] * len(prompts))
        return images.flatten(0, 1)

    def render_unedited(self, model: Model, prompt: str) -> torch.Tensor:
        key = (prompt, self.render_seed, self.renderer.steps)
        if key not in model.renders:
            model.renders[key] = self.render([model.vector], [prompt])
        return model.renders[key]

    def edit_view(self, model: Model, strengths: dict[str, float], prompt: str = DEFAULT_PROMPT):
        """What the Edit tab shows: renders of the edited and the unedited model (the latter cached on
        `model`), and `scores` of the pair. Returns (edited, unedited, scores)."""
        unedited = self.render_unedited(model, prompt)
        edited = self.render([self.edited(model, strengths)], [prompt])
        return edited, unedited, self.scores(edited, unedited)

    def scores(self, edited: torch.Tensor, unedited: torch.Tensor) -> dict:
        """ID similarity of the edited render to the unedited one, and the classifier's scores of both."""
        if self.evaluators is None:
            return {}
        both = torch.cat([edited, unedited])
        probs = self.evaluators.attributes(both)
        return {
            "id_similarity": float(self.evaluators.similarity(edited, unedited)[0]),
            "attributes": {name: (float(probs[0, j]), float(probs[1, j]))
                           for j, name in enumerate(self.evaluators.attribute_names)},
        }

    # ------------------------------------------------------------------ inversion
    def invert(self, image: Image.Image, mask: Image.Image | None = None, steps: int = 100, preset: str = "in",
               progress: Callable[[int, float], None] | None = None):
        """One image -> InversionResult."""
        from w2w_core.render import pil_to_tensor

        target = pil_to_tensor(image, self.base.resolution)
        weight = None if mask is None else (pil_to_tensor(mask, self.base.resolution).mean(0) + 1) / 2
        with self.lock:
            return self.space.invert(target, base=self.base, preset=preset, steps=int(steps), mask=weight,
                                     seed=self.render_seed, progress=progress)

    # ------------------------------------------------------------------ nearest, export
    def nearest(self, vector: torch.Tensor, k: int = 4) -> list[tuple[str, float, torch.Tensor]]:
        """The k nearest training identities: (identity, PC distance, its model's vector)."""
        index = {name: i for i, name in enumerate(self.space.identities)}
        return [(name, dist, self.space.reconstruct(self.space.coefficients[index[name]]))
                for name, dist in self.space.nearest(vector, k=k)]

    def export(self, vector: torch.Tensor, label: str) -> list[Path]:
        """Write the model for download: diffusers LoRA, kohya LoRA (where the layout allows),
        PC coefficients, and the w2w model file (the layout in its header). Returns the files."""
        from safetensors.torch import save_file

        name = re.sub(r"[^A-Za-z0-9+-]+", "_", label).strip("_") or "model"  # ASCII file names
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        files = [self.space.save_lora(vector, folder / "diffusers", format="diffusers")]
        try:
            files.append(self.space.save_lora(vector, folder / f"{name}_kohya", format="kohya"))
        except (ValueError, NotImplementedError):
            pass  # not every layout has a kohya spelling; the diffusers file is always there
        coefficients = folder / f"{name}_coefficients.safetensors"
        save_file({"coefficients": self.space.project(vector).contiguous()}, str(coefficients),
                  metadata={"label": label, "components": str(self.space.k)})
        files.append(coefficients)
        files.append(self.space.layout.save(vector, folder / f"{name}_w2w_model.safetensors", metadata={"label": label}))
        return files

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


# ---------------------------------------------------------------------- the page
def to_display(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images upscaled to DISPLAY_SIZE (nearest neighbour)."""
    from w2w_core.render import tensor_to_pil

    return [tensor_to_pil(x).resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.NEAREST) for x in images]


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in str(text).replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"seeds {text!r}: expected whole numbers separated by commas, e.g. 0, 1, 2, 3") from None
    if not 1 <= len(seeds) <= 8:
        raise ValueError("give between 1 and 8 seeds")
    return seeds


def scores_markdown(scores: dict) -> str:
    if not scores:
        return "No evaluators for this space (they exist for the tiny world): no ID similarity or attribute scores."
    names = list(scores["attributes"])
    lines = [f"**ID similarity to the unedited model: {scores['id_similarity']:.3f}**", "",
             "Attribute classifier: probability of each attribute", "",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row, column in (("edited", 0), ("unedited", 1)):
        lines.append(f"| {row} | " + " | ".join(f"{scores['attributes'][n][column]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def launch_options(max_upload_bytes: int = MAX_UPLOAD_BYTES) -> dict:
    """Keyword arguments for the app's `.launch()`: the upload size limit, enforced by the server before
    any handler runs, and a theme without web fonts (the page works offline)."""
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return dict(theme=theme, max_file_size=max_upload_bytes)


def build_app(explorer: Explorer):
    """The Gradio Blocks of the explorer (`.launch(**launch_options())` on it, or use `serve`)."""
    import gradio as gr

    space, attributes = explorer.space, explorer.attributes

    def guarded(fn):
        """Known input errors become a message in the page (gr.Error), never a stack trace. functools.wraps
        keeps fn's signature visible: Gradio reads it to pass a live gr.Progress to do_invert."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (ValueError, FileNotFoundError) as err:
                raise gr.Error(str(err)) from None

        return wrapper

    def need(model: Model | None) -> Model:
        if model is None:
            raise ValueError("no current model yet: sample one (Sample tab) or invert an image (Invert tab) first")
        return model

    def describe(model: Model | None, *strengths) -> str:
        if model is None:
            return "**Current model:** none yet. Sample one or invert an image."
        edits = ", ".join(f"{a} {s:+g}σ" for a, s in zip(attributes, strengths) if s)
        return f"**Current model:** {model.label}" + (f", edited: {edits}" if edits else "")

    reset = [0.0] * len(attributes)

    @guarded
    def do_sample(seeds_text: str, prompt: str):
        seeds = parse_seeds(seeds_text)
        models = [explorer.sample(s) for s in seeds]
        images = explorer.render([m.vector for m in models], [prompt or DEFAULT_PROMPT])
        gallery = [(img, f"seed {s}") for img, s in zip(to_display(images), seeds)]
        return gallery, seeds, models[0], *reset

    def pick_sample(seeds: list[int], evt: gr.SelectData):
        return explorer.sample(seeds[evt.index]), *reset

    @guarded
    def do_edit(model: Model | None, prompt: str, *strengths):
        model = need(model)
        prompt = prompt or DEFAULT_PROMPT
        started = time.perf_counter()
        edited, unedited, found = explorer.edit_view(model, dict(zip(attributes, strengths)), prompt)
        text = scores_markdown(found)
        shown = to_display(torch.cat([edited, unedited]))
        return shown[0], shown[1], text + f"\n\n*rendered in {time.perf_counter() - started:.2f} s*"

    @guarded
    def do_invert(image_path, mask_path, steps, preset, prompts_text, progress=gr.Progress()):
        image = check_upload(image_path)
        mask = check_upload(mask_path) if mask_path else None
        steps = int(steps)
        progress(0.0, desc="inverting")

        def report(step: int, loss: float) -> None:
            progress((step + 1, steps), desc=f"step {step + 1}/{steps}, loss {loss:.4f}")

        result = explorer.invert(image, mask, steps=steps, preset=preset, progress=report)
        prompts = [p.strip() for p in str(prompts_text).splitlines() if p.strip()] or [DEFAULT_PROMPT]
        renders = to_display(explorer.render([result.vector], prompts))
        gallery = [(img, p) for img, p in zip(renders, prompts)]
        from w2w_core.render import pil_to_tensor

        shown_input = to_display(pil_to_tensor(image, explorer.base.resolution)[None])[0]
        text = (f"Inverted with {result.components} PCs{' and the mask' if mask is not None else ''}, "
                f"{len(result.losses)} steps in {result.seconds:.1f} s "
                f"(final loss {result.losses[-1]:.4f}). It is now the current model: edit it in the Edit tab.")
        model = Model(result.vector, f"inversion of {Path(image_path).name}")
        return [(shown_input, "input")] + gallery, text, model, *reset

    @guarded
    def do_nearest(model: Model | None, k, prompt: str, *strengths):
        model = need(model)
        vector = explorer.edited(model, dict(zip(attributes, strengths)))
        found = explorer.nearest(vector, int(k))
        images = to_display(explorer.render([vector] + [v for _, _, v in found], [prompt or DEFAULT_PROMPT]))
        gallery = [(images[0], "current model")] + [(img, f"{n} (distance {d:.1f})") for img, (n, d, _) in zip(images[1:], found)]
        table = [[n, round(d, 3)] for n, d, _ in found]
        return gallery, table

    @guarded
    def do_download(model: Model | None, *strengths):
        model = need(model)
        label = model.label + "".join(f" {a}{s:+g}" for a, s in zip(attributes, strengths) if s)
        return [str(p) for p in explorer.export(explorer.edited(model, dict(zip(attributes, strengths))), label)]

    # delete_cache: renders, uploads and downloads older than an hour are deleted, hourly (and at a restart)
    with gr.Blocks(title="w2w explorer", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        model_state = gr.State(None)
        seeds_state = gr.State([])
        gr.Markdown(f"# w2w explorer\n`{space!r}`")
        current = gr.Markdown(describe(None), elem_id="current-model")
        sliders = []
        with gr.Tabs():
            with gr.Tab("Sample", id="sample"):
                with gr.Row():
                    seeds_box = gr.Textbox("0, 1, 2, 3", label="seeds (comma-separated, up to 8)", elem_id="seeds")
                    sample_prompt = gr.Textbox(DEFAULT_PROMPT, label="prompt", elem_id="sample-prompt")
                sample_button = gr.Button("Sample", variant="primary", elem_id="sample-button")
                gallery = gr.Gallery(label="new identities (click one to make it the current model)", columns=4,
                                     height=360, object_fit="contain", format="png",
                                     fit_columns=False, elem_id="sample-gallery")
            with gr.Tab("Edit", id="edit"):
                edit_prompt = gr.Textbox(DEFAULT_PROMPT, label="prompt", elem_id="edit-prompt")
                with gr.Row():
                    with gr.Column(scale=1):
                        for name in attributes:
                            sliders.append(gr.Slider(-SLIDER_RANGE, SLIDER_RANGE, value=0.0, step=0.25,
                                                     label=f"{name} (calibrated σ)", elem_id=f"slider-{name}"))
                        if not attributes:
                            gr.Markdown("No attribute directions in this space: run `w2w directions` first.")
                    with gr.Column(scale=2):
                        with gr.Row():
                            edited_image = gr.Image(label="edited", format="png", interactive=False, elem_id="edited-image")
                            unedited_image = gr.Image(label="unedited", format="png", interactive=False,
                                                      elem_id="unedited-image")
                        scores = gr.Markdown(elem_id="edit-scores")
            with gr.Tab("Invert", id="invert"):
                with gr.Row():
                    upload = gr.Image(type="filepath", label="image (PNG/JPEG)", sources=["upload"], elem_id="invert-image")
                    mask_upload = gr.Image(type="filepath", label="optional mask (white = counts)", sources=["upload"],
                                           elem_id="invert-mask")
                with gr.Row():
                    steps = gr.Slider(1, 800, value=100, step=1, label="steps", elem_id="invert-steps")
                    preset = gr.Radio(["in", "out"], value=explorer.default_preset,
                                      label="preset (in: faces, lr 0.1; out: paintings, cartoons, lr 1.0)",
                                      elem_id="invert-preset")
                prompts_box = gr.Textbox("\n".join(INVERT_PROMPTS), lines=3, label="render the result in (one prompt per line)",
                                         elem_id="invert-prompts")
                invert_button = gr.Button("Invert", variant="primary", elem_id="invert-button")
                invert_status = gr.Markdown(elem_id="invert-status")
                invert_gallery = gr.Gallery(label="input and the inverted model in new prompts", columns=4, height=360,
                                            object_fit="contain", format="png", fit_columns=False,
                                            elem_id="invert-gallery")
            with gr.Tab("Nearest", id="nearest"):
                k_box = gr.Slider(1, 8, value=4, step=1, label="how many", elem_id="nearest-k")
                nearest_button = gr.Button("Find the nearest training identities", variant="primary", elem_id="nearest-button")
                nearest_gallery = gr.Gallery(label="current model and its nearest training identities", columns=5,
                                             height=300, object_fit="contain", format="png", fit_columns=False,
                                             elem_id="nearest-gallery")
                nearest_table = gr.Dataframe(headers=["identity", "PC distance"], interactive=False, elem_id="nearest-table")
            with gr.Tab("Download", id="download"):
                gr.Markdown("The current model (with its edits): `pytorch_lora_weights.safetensors` for diffusers (put it "
                            "in a folder, then `pipe.load_lora_weights(folder)`), the kohya file for A1111/ComfyUI, its "
                            "PC coefficients, and the w2w model file (`WeightSpace.layout.load`, `w2w edit --lora`).")
                download_button = gr.Button("Prepare the files", variant="primary", elem_id="download-button")
                files = gr.File(label="files", file_count="multiple", interactive=False, elem_id="download-files")

        edit_inputs = [model_state, edit_prompt, *sliders]
        edit_outputs = [edited_image, unedited_image, scores]
        (sample_button.click(do_sample, [seeds_box, sample_prompt], [gallery, seeds_state, model_state, *sliders])
         .success(do_edit, edit_inputs, edit_outputs))
        (gallery.select(pick_sample, [seeds_state], [model_state, *sliders])
         .then(do_edit, edit_inputs, edit_outputs))
        (invert_button.click(do_invert, [upload, mask_upload, steps, preset, prompts_box],
                             [invert_gallery, invert_status, model_state, *sliders])
         .success(do_edit, edit_inputs, edit_outputs))
        if sliders:
            gr.on([s.release for s in sliders] + [edit_prompt.submit], do_edit, edit_inputs, edit_outputs,
                  trigger_mode="always_last")
        # release, not change: a slider's change fires on every keystroke in its number box, also on the
        # half-typed "-" of a negative strength, which holds no number yet
        gr.on([model_state.change] + [s.release for s in sliders], describe, [model_state, *sliders], current,
              show_progress="hidden")
        nearest_button.click(do_nearest, [model_state, k_box, edit_prompt, *sliders], [nearest_gallery, nearest_table])
        download_button.click(do_download, [model_state, *sliders], files)
    return app


def serve(out, host: str = "127.0.0.1", port: int = 7860, render_steps: int = 25, evaluators: bool = True,
          threads: int | None = 1, log=print) -> None:
    """Load the space at `out` and serve the explorer on host:port until interrupted.

    `threads`: torch's CPU threads (None: torch's default). One by default: a batch-1 render of the tiny
    model gains nothing from a second thread, and two threads collapse when other processes share the
    cores (docs/SERVE.md: 0.9 s against 8-80 s per render on the busy 2-core machine)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    if threads is not None:
        torch.set_num_threads(int(threads))
    from w2w_core.space import WeightSpace

    space = WeightSpace.load(out)
    found = None
    if evaluators and space.model_config().path == "builtin:tiny":
        from pipeline.eval.evaluators import load_evaluators

        found = load_evaluators()  # the tiny world's identity embedder and attribute classifier
    explorer = Explorer(space, evaluators=found, render_steps=render_steps)
    app = build_app(explorer)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"w2w serve: listening on {host}: anyone who reaches this address can use the explorer (no login)")
    app.queue(default_concurrency_limit=1)
    _, url, _ = app.launch(server_name=host, server_port=int(port), prevent_thread_lock=True, quiet=True,
                           show_error=True, footer_links=[], **launch_options())
    log(f"w2w explorer of {out}: {url} (Ctrl+C stops it)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a terminate also cleans up below
    try:
        while True:
            time.sleep(3600)
    finally:
        app.close()
        explorer.close()
