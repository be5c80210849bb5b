"""Latency of `w2w serve` on a CPU: seconds per render, per edit, per inversion (docs/SERVE.md).

Times the explorer's own calls (pipeline.serve.Explorer: what each button runs, without the
browser and HTTP around it) on a finished space, each repeated and summarised by the median:

    python benchmarks/serve_latency.py runs/demo --json docs/bench/serve_cpu.json

Sample: one and four seeds rendered for one prompt. Edit: one slider move (the edited render and
the evaluators' scores; the unedited render is cached per model). Nearest: 4 neighbours rendered
next to the current model. Download: the files written for one model. Invert: --invert-steps
steps of the tiny world's default preset, then the result rendered in three prompts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def timed(fn, repeats: int) -> dict:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3), "runs": len(seconds)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="a finished space (build output folder), e.g. runs/demo; only read")
    parser.add_argument("--render-steps", type=int, default=25, help="DDIM steps per render (the server's default 25)")
    parser.add_argument("--invert-steps", type=int, default=100, help="inversion steps (the page's default 100)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (w2w serve's default 1)")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)

    import torch

    from pipeline.eval.evaluators import load_evaluators
    from pipeline.serve import DEFAULT_PROMPT, INVERT_PROMPTS, Explorer, Model
    from w2w_core.render import tensor_to_pil
    from w2w_core.space import WeightSpace

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    space = WeightSpace.load(args.out)
    explorer = Explorer(space, evaluators=load_evaluators(), render_steps=args.render_steps)
    load_s = time.perf_counter() - started
    model = explorer.sample(0)
    explorer.render([model.vector], [DEFAULT_PROMPT])  # warm-up
    name = sorted(space.directions)[0]
    strength = iter([0.5 * (i % 12 + 1) for i in range(1000)])  # a new slider value each edit
    results = {
        "sample_1_seed": timed(lambda: explorer.render([explorer.sample(1).vector], [DEFAULT_PROMPT]), args.repeats),
        "sample_4_seeds": timed(lambda: explorer.render([explorer.sample(s).vector for s in range(4)], [DEFAULT_PROMPT]),
                                args.repeats),
        "edit_slider_move": timed(lambda: explorer.edit_view(model, {name: next(strength)}), args.repeats),
        "nearest_4": timed(lambda: explorer.render([model.vector] + [v for _, _, v in explorer.nearest(model.vector, 4)],
                                                   [DEFAULT_PROMPT]), args.repeats),
        "download_files": timed(lambda: explorer.export(model.vector, "bench"), args.repeats),
    }
    target = tensor_to_pil(explorer.render([explorer.sample(99).vector], [DEFAULT_PROMPT])[0])
    invert_runs = []
    for _ in range(max(1, args.repeats // 2)):
        t0 = time.perf_counter()
        result = explorer.invert(target, steps=args.invert_steps, preset=explorer.default_preset)
        t1 = time.perf_counter()
        explorer.render([result.vector], list(INVERT_PROMPTS))
        invert_runs.append((t1 - t0, time.perf_counter() - t1))
    results["invert"] = {"steps": args.invert_steps, "preset": explorer.default_preset,
                         "median_fit_s": round(statistics.median(r[0] for r in invert_runs), 2),
                         "median_render_3_prompts_s": round(statistics.median(r[1] for r in invert_runs), 3),
                         "seconds_per_step": round(statistics.median(r[0] for r in invert_runs) / args.invert_steps, 4),
                         "runs": len(invert_runs)}
    explorer.close()
    report = {"space": repr(space), "render_steps": args.render_steps, "load_s": round(load_s, 2),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
              "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],  # other work on the machine
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
