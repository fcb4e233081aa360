"""`rayhorde generate`: a command-line client of the AI Horde API (this cluster's or any other).

    rayhorde generate "a lighthouse on a cliff ### fog" --model tiny-sd15 --n 2 --out images/
    rayhorde generate --text "Once upon a time" --model tiny-llm --max-length 60

It submits, shows a progress bar (finished of n, with the queue position, wait time and what
is generating) while it polls, then saves the images (or prints the text, and saves it with
--out). Ctrl-C cancels the request.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

POLL_SECONDS = 1.0


class GenerateError(Exception):
    pass


def _check(r: httpx.Response) -> dict:
    if r.status_code >= 400:
        try:
            body = r.json()
            message = body.get("message") or body
        except ValueError:
            message = r.text
        raise GenerateError(f"{r.status_code}: {message}")
    return r.json()


def progress_bar(n: int, unit: str) -> tqdm:
    return tqdm(total=n, desc="done", unit=unit, file=sys.stderr, dynamic_ncols=True,
                bar_format="{desc}: {n_fmt}/{total_fmt} {unit}s |{bar}| {elapsed}{postfix}")


def show(bar: tqdm, state: dict) -> None:
    """The bar at a poll's answer: finished of n, and where the rest stands."""
    bar.n = state["finished"]
    rest = [f"{state['processing']} generating"] if state["processing"] else []
    if state["waiting"]:
        rest.append(f"{state['waiting']} waiting, queue position {state['queue_position']}, "
                    f"about {state['wait_time']} s")
    if not state.get("is_possible", True):
        rest.append("no worker serves its model now")
    bar.set_postfix_str(", ".join(rest), refresh=False)
    bar.refresh()


def image_body(args: argparse.Namespace) -> dict:
    params = {"width": args.width, "height": args.height, "steps": args.steps, "n": args.n,
              "cfg_scale": args.cfg_scale, "sampler_name": args.sampler}
    if args.seed is not None:
        params["seed"] = args.seed
    return {"prompt": args.prompt, "models": [args.model] if args.model else [], "params": params,
            "nsfw": args.nsfw, "r2": True}


def text_body(args: argparse.Namespace) -> dict:
    params = {"max_length": args.max_length, "max_context_length": args.max_context_length,
              "n": args.n}
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    return {"prompt": args.text, "models": [args.model] if args.model else [], "params": params}


def run(args: argparse.Namespace, out=None) -> list[Path | str]:
    """Submit, wait, save. Returns the files written (images) or the texts."""
    out = out or sys.stdout  # looked up now: a caller may have replaced it
    base = args.url.rstrip("/") + "/api/v2"
    headers = {"apikey": args.api_key, "Client-Agent": "rayhorde-cli:1:none"}
    is_text = args.text is not None
    submit = f"{base}/generate/text/async" if is_text else f"{base}/generate/async"
    status_path = "generate/text/status" if is_text else "generate/status"
    poll_path = "generate/text/status" if is_text else "generate/check"
    with httpx.Client(timeout=60, headers=headers) as http:
        queued = _check(http.post(submit, json=text_body(args) if is_text else image_body(args)))
        rid = queued["id"]
        for warning in queued.get("warnings") or []:
            print(f"warning: {warning['message']}", file=sys.stderr)
        print(f"queued {rid} for {queued['kudos']} kudos", file=sys.stderr, flush=True)
        with progress_bar(args.n, "text" if is_text else "image") as bar:
            try:
                while True:
                    state = _check(http.get(f"{base}/{poll_path}/{rid}"))
                    show(bar, state)
                    if state["done"] or state["faulted"]:
                        break
                    time.sleep(POLL_SECONDS)
            except KeyboardInterrupt:
                _check(http.delete(f"{base}/{status_path}/{rid}"))
                raise GenerateError(f"cancelled {rid}") from None
        final = _check(http.get(f"{base}/{status_path}/{rid}"))
        if final["faulted"] and not final["generations"]:
            raise GenerateError(f"request {rid} faulted")
        if is_text:
            results: list[Path | str] = []
            for i, g in enumerate(final["generations"]):
                print(g["text"], file=out)
                results.append(g["text"])
                if args.out:
                    path = Path(args.out) / f"{rid}-{i}.txt"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(g["text"])
            return results
        out_dir = Path(args.out or ".")
        out_dir.mkdir(parents=True, exist_ok=True)
        files: list[Path | str] = []
        for g in final["generations"]:
            img = g["img"]
            data = _check_bytes(http.get(img)) if img.startswith("http") else base64.b64decode(img)
            path = out_dir / f"{g['id']}-{g['seed']}.webp"
            path.write_bytes(data)
            files.append(path)
            print(f"{path} (seed {g['seed']}, {g['model']}, by {g['worker_name']})", file=out)
        return files


def _check_bytes(r: httpx.Response) -> bytes:
    if r.status_code >= 400:
        raise GenerateError(f"downloading an image: {r.status_code}")
    return r.content


def main(args: argparse.Namespace) -> int:
    try:
        run(args)
        return 0
    except (GenerateError, httpx.HTTPError) as e:
        print(f"\nrayhorde generate: {e}", file=sys.stderr)
        return 1


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate an image (or --text) through an AI Horde API")
    p.add_argument("prompt", nargs="?", help="image prompt; '###' starts the negative prompt")
    p.add_argument("--text", help="generate text from this prompt instead of an image")
    p.add_argument("--url", default=os.environ.get("RAYHORDE_URL", "http://127.0.0.1:8000"),
                   help="the API (default $RAYHORDE_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=os.environ.get("RAYHORDE_API_KEY", "0000000000"),
                   help="default $RAYHORDE_API_KEY, else anonymous")
    p.add_argument("--model", help="a model the cluster serves (default: any)")
    p.add_argument("--n", type=int, default=1, help="how many images or texts")
    p.add_argument("--seed")
    p.add_argument("--out", help="folder to save into (images default to the current folder)")
    image = p.add_argument_group("image")
    image.add_argument("--width", type=int, default=512)
    image.add_argument("--height", type=int, default=512)
    image.add_argument("--steps", type=int, default=20)
    image.add_argument("--cfg-scale", type=float, default=7.0)
    image.add_argument("--sampler", default="k_euler_a")
    image.add_argument("--nsfw", action="store_true")
    text = p.add_argument_group("text")
    text.add_argument("--max-length", type=int, default=80)
    text.add_argument("--max-context-length", type=int, default=1024)
    text.add_argument("--temperature", type=float)
    text.add_argument("--top-p", type=float)
    text.add_argument("--top-k", type=int)

    def checked(args: argparse.Namespace) -> int:
        if (args.prompt is None) == (args.text is None):
            p.error("give an image prompt or --text PROMPT (one of them)")
        return main(args)

    p.set_defaults(func=checked)
