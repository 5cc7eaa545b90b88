"""Certified accuracy in pixel space of the classification recipe's certified pipeline, at several budgets.

    python -m benchmarks.certified                            # Fashion-MNIST, eps 1, 3, 8; rewrites RESULTS.md
    python -m benchmarks.certified --dataset digits --epsilons 3 --results /tmp/R.md

Each row is one run of ``recipes.classify.run`` with ``normalisation="lipschitz"`` (every stage before the head has a
certified constant, so the radii are L2 norms in the units of the images as loaded; its radius c and other settings
are the recipe's defaults, chosen on a validation split: README) on the test split, read once per row. Beside it,
the default ``standardise`` pipeline's clean accuracy, which has no certificate in pixel space.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from benchmarks.report import OUT_DIR, RESULTS, load_average, machine_paragraph, table, write_json, write_section

logger = logging.getLogger(__name__)

SECTION = "certified"


def render(runs: list[dict], standard: dict[float, float], threads: set[int], load: list[float]) -> str:
    """The section: clean and pixel-space certified accuracy per epsilon."""
    radii = [radius for radius in runs[0]["certified_accuracy"] if float(radius) > 0]
    rows = [[f"{run['epsilon']:.2f}", f"{100 * standard[run['target_epsilon']]:.2f}", f"{100 * run['accuracy']:.2f}",
             *(f"{100 * run['certified_accuracy'][radius]:.1f}" for radius in radii), f"{run['pixel_lipschitz']:.2f}"]
            for run in runs]
    example = runs[0]
    return "\n".join([
        f"`recipes.classify` on {example['dataset']} (test split, delta = {example['delta']:g}, seed 0): the default "
        "`standardise` pipeline (no certificate in pixel space) beside the certified `--normalisation lipschitz` one "
        f"(radius c = {example['radius']:g}), whose certified accuracy is at L2 radii in the units of the images as "
        "loaded (pixels / 255: a radius of 1 is one pixel from black to white). "
        "Regenerate: `python -m benchmarks.certified`.",
        "",
        table(["epsilon spent", "standardise acc. %", "lipschitz acc. %", *(f"certified r = {r} %" for r in radii),
               "pixel Lipschitz"], rows),
        "",
        machine_paragraph(threads, load),
    ])


def main(argv: list[str] | None = None) -> int:
    """Run the recipe per epsilon (both normalisations) and rewrite the RESULTS.md section."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.certified", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file whose section is rewritten")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load = load_average()
    import torch

    from recipes.classify import run

    runs, standard = [], {}
    for epsilon in args.epsilons:
        certified = run(args.dataset, epsilon=epsilon, normalisation="lipschitz", progress=False)
        runs.append({**certified, "target_epsilon": epsilon})
        standard[epsilon] = run(args.dataset, epsilon=epsilon, progress=False)["accuracy"]
        logger.info("eps=%g: lipschitz %.4f (certified %s), standardise %.4f", epsilon, certified["accuracy"],
                    certified["certified_accuracy"], standard[epsilon])
    write_json(OUT_DIR / f"{SECTION}.json", {"runs": runs, "standardise_accuracy": standard})
    print(f"wrote {write_section(SECTION, render(runs, standard, {torch.get_num_threads()}, load), args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
