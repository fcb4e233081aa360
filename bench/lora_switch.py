"""What LoRAs cost per job on the tiny SD 1.5 pipeline, apart from the diffusion steps: the
`apply_adapters` call alone, in milliseconds.

    .venv/bin/python bench/lora_switch.py [--repeat 20]

- first use: a LoRA the pipeline has never seen (load_lora_weights from the .safetensors file,
  PEFT layer injection, set_adapters), each time on a fresh pipeline;
- cached: the same LoRA as the previous job (set_adapters only);
- switch: alternating between two LoRAs the pipeline already holds;
- none after LoRA: a job without LoRAs after one with (disable_lora).
The tiny model's layers are few (8 UNet + 20 text encoder projections), so these are the
per-call overheads; a real SD 1.5 LoRA touches ~260 layers and loading reads ~10-150 MB.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.adapter_loading import apply_adapters  # noqa: E402
from models.adapters import AdapterCatalog, AdapterResolver, LoraSpec  # noqa: E402
from models.tiny import build_tiny_sd15  # noqa: E402


def ms(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        catalog = AdapterCatalog.model_validate({"cache_dir": tmp, "adapters": [
            {"name": n, "kind": "lora", "baseline": "stable_diffusion_1", "source": {"kind": "builtin", "path": n}}
            for n in ("tiny-lora", "tiny-lora-2")]})
        resolver = AdapterResolver(catalog)
        a = (LoraSpec(name="tiny-lora"), resolver.resolve("lora", "tiny-lora"))
        b = (LoraSpec(name="tiny-lora-2", model=0.8), resolver.resolve("lora", "tiny-lora-2"))
        pipes = [build_tiny_sd15() for _ in range(args.repeat)]
        it = iter(pipes)
        first = ms(lambda: apply_adapters(next(it), [a], [], "p", ""), args.repeat)
        pipe = pipes[0]
        apply_adapters(pipe, [b], [], "p", "")
        cached = ms(lambda: apply_adapters(pipe, [a], [], "p", ""), args.repeat)
        flip = [a, b]
        switch = ms(lambda: (flip.reverse(), apply_adapters(pipe, [flip[0]], [], "p", "")), args.repeat)
        both = ms(lambda: apply_adapters(pipe, [a, b], [], "p", ""), args.repeat)

        def none_after():
            apply_adapters(pipe, [a], [], "p", "")
            t = time.perf_counter()
            apply_adapters(pipe, [], [], "p", "")
            return (time.perf_counter() - t) * 1000

        none = sorted(none_after() for _ in range(args.repeat))
        resolve = ms(lambda: resolver.resolve("lora", "tiny-lora"), args.repeat)
    print(f"apply_adapters on tiny SD 1.5, ms (median / min of {args.repeat}):")
    for label, (med, lo) in (("first use (load)", first), ("cached, same LoRA", cached),
                             ("switch between 2 cached", switch), ("2 cached LoRAs at once", both),
                             ("resolve (catalog, cached file)", resolve)):
        print(f"  {label:32s} {med:8.2f} / {lo:8.2f}")
    print(f"  {'no LoRA after a LoRA job':32s} {statistics.median(none):8.2f} / {none[0]:8.2f}")


if __name__ == "__main__":
    main()
