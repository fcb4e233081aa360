"""The multi-step workflows' shared graph runner (deployments/workflows/graph.py) and their
nodes on the tiny models without Ray: a node whose replica died is retried, one that refuses
its input fails the graph naming it; remix images and strengths decide the result."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image
from ray.exceptions import ActorDiedError

from deployments.diffusion.deployment import DiffusionGenerator
from deployments.jobs import ImageJob, JobRejected
from deployments.workflows.graph import Graph, GraphFailed
from models.catalog import Family, load_catalog

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")]


class Flaky:
    """A node call that fails `failures` times with `error`, then answers."""

    def __init__(self, failures: int, error: Exception):
        self.calls, self.failures, self.error = 0, failures, error

    async def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "answer"


def test_a_node_whose_replica_died_is_retried_and_timed():
    graph, call = Graph("test"), Flaky(2, ActorDiedError())
    assert asyncio.run(graph.node("encode 0", call)) == "answer"
    assert call.calls == 3 and graph.timings["encode 0"] >= 0
    reply = graph.finish({"images": []})
    assert set(reply["timings"]) == {"encode 0"} and reply["graph_seconds"] >= 0


def test_a_graph_fails_for_good_naming_the_node():
    with pytest.raises(GraphFailed, match="test node encode 1: .*bad image") as failed:
        asyncio.run(Graph("test").node("encode 1", Flaky(1, JobRejected("source_image: bad image"))))
    assert isinstance(failed.value, JobRejected)  # faulted at once by the dispatcher
    crash = Flaky(5, ActorDiedError())
    with pytest.raises(GraphFailed, match="test node stage C . B failed: ActorDiedError"):
        asyncio.run(Graph("test", attempts=3).node("stage C + B", crash))
    assert crash.calls == 3
    bug = Flaky(5, RuntimeError("out of memory"))  # not a lost replica: not retried
    with pytest.raises(GraphFailed, match="out of memory"):
        asyncio.run(Graph("test").node("guided pass", bug))
    assert bug.calls == 1


@pytest.fixture(scope="module")
def cascade():
    torch.set_num_threads(1)
    gen = DiffusionGenerator(Family.stable_cascade, [load_catalog("configs/models.yaml").get("tiny-cascade")],
                             device="cpu")
    return gen, gen.load("tiny-cascade")


def png(color, size=(96, 80)) -> bytes:
    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], 40, 200), (10, 10, 50, 40))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def remix_job(extras=(), seed=3) -> ImageJob:
    return ImageJob.parse({"model": "tiny-cascade", "prompt": "a cat", "seeds": [seed], "width": 128,
                           "height": 128, "steps": 4, "workflow": "remix", "source_image": png((200, 30, 30)),
                           "extra_source_images": [{"image": img, "strength": s} for img, s in extras]})


def remix(cascade, extras=(), seed=3) -> np.ndarray:
    """The remix graph's nodes in order, in this process: encode each image, then stage C+B."""
    from deployments.diffusion import cascade as cascade_module
    from deployments.diffusion.common import decode_source

    gen, pipes = cascade
    job = remix_job(extras, seed)
    images = [job.source_image, *(e.image for e in job.extra_source_images)]
    embeddings = [cascade_module.encode_image(pipes, decode_source(i, "x")).numpy() for i in images]
    assert all(e.shape == (1, 1, 32) for e in embeddings)  # [1, tokens, clip_image_in_channels]
    (out,) = gen.remix(pipes, job, embeddings)
    assert out.size == (128, 128)
    return np.asarray(out, dtype=np.float32)


def test_remix_images_and_strengths_decide_the_image(cascade):
    alone = remix(cascade)
    assert np.array_equal(alone, remix(cascade))  # same inputs, same image
    green, blue = png((30, 200, 30)), png((30, 30, 200))
    with_green = remix(cascade, [(green, 1.0)])
    # The tiny random prior listens faintly to its image conditioning (a few tokens among the
    # text's 77, each layer-normed) and its saturated images hide much of it: the differences
    # are small but real, and the same inputs give the very same image.
    for other in (alone, remix(cascade, [(blue, 1.0)]), remix(cascade, [(green, 4.0)])):
        assert np.abs(other - with_green).mean() > 0.005
    gen, pipes = cascade
    with pytest.raises(JobRejected, match="extra_source_images"):
        gen.remix(pipes, remix_job([(green, 1.0)]), [])


@pytest.fixture(scope="module")
def sd15():
    torch.set_num_threads(1)
    catalog = load_catalog("configs/models.yaml")
    gen = DiffusionGenerator(Family.stable_diffusion_1, [catalog.get("tiny-sd15")], device="cpu",
                             controlnets=catalog.controlnets)
    return gen, gen.load("tiny-sd15")


def controlled(sd15, control: Image.Image, **job) -> np.ndarray:
    gen, pipe = sd15
    parsed = ImageJob.parse({"model": "tiny-sd15", "prompt": "a house", "seeds": [5], "width": 128,
                             "height": 128, "steps": 6, "sampler_name": "k_euler", "workflow": "controlnet",
                             "control_type": "canny", "source_image": png((10, 10, 10)), **job})
    (out,) = gen.controlled(pipe, parsed, control)
    assert out.size == (128, 128)
    return np.asarray(out, dtype=np.float32)


def test_the_guided_pass_follows_its_control_map_and_strength(sd15):
    from models.annotators import build_annotator

    squares = (np.indices((128, 128)).sum(axis=0) // 16 % 2 * 255).astype(np.uint8)
    edges = build_annotator("canny")(Image.fromarray(squares).convert("RGB"))
    assert np.asarray(edges).mean() > 10  # a map with plenty to follow
    blank = Image.new("RGB", (128, 128))
    a = controlled(sd15, edges)
    assert np.array_equal(a, controlled(sd15, edges))
    # Deterministic runs that differ only in the map (or its strength): any change is theirs.
    assert np.abs(a - controlled(sd15, blank)).mean() > 0.2  # the map matters
    assert np.abs(a - controlled(sd15, edges, control_strength=0.2)).mean() > 0.2  # and its strength
    gen, pipe = sd15
    plain = np.asarray(gen.generate(pipe, {"model": "tiny-sd15", "prompt": "a house", "seeds": [5],
                                           "width": 128, "height": 128, "steps": 6,
                                           "sampler_name": "k_euler"})[0], dtype=np.float32)
    assert np.abs(controlled(sd15, edges, control_strength=0.0) - plain).max() <= 1.0  # 0: no guidance
    job = {"model": "tiny-sd15", "prompt": "x", "seeds": [1], "workflow": "controlnet",
           "control_type": "canny", "source_image": png((1, 2, 3))}
    no_controlnets = DiffusionGenerator(Family.stable_diffusion_1,
                                        [load_catalog("configs/models.yaml").get("tiny-sd15")], device="cpu")
    with pytest.raises(JobRejected, match="control_type: no canny ControlNet"):
        no_controlnets.controlled(pipe, ImageJob.parse(job), edges)


def test_a_builtin_controlnet_after_a_lora_is_the_same(sd15):
    """A replica that ran a LoRA job first (PEFT wraps the UNet's layers) makes the same
    builtin ControlNet as a fresh one."""
    from models.adapters import load_adapter_catalog
    from models.loaders import load_controlnet

    catalog = load_catalog("configs/models.yaml")
    entry = catalog.controlnet_for(Family.stable_diffusion_1, "canny")
    gen, pipe = sd15
    fresh = load_controlnet(entry, pipe.unet).state_dict()
    lora_gen = DiffusionGenerator(Family.stable_diffusion_1, [catalog.get("tiny-sd15")], device="cpu",
                                  adapters=load_adapter_catalog("configs/adapters.yaml"))
    lora_pipe = lora_gen.load("tiny-sd15")
    lora_gen.generate(lora_pipe, {"model": "tiny-sd15", "prompt": "x", "seeds": [1], "width": 64,
                                  "height": 64, "steps": 1, "loras": [{"name": "tiny-lora"}]})
    after = load_controlnet(entry, lora_pipe.unet).state_dict()
    assert fresh.keys() == after.keys() and all(torch.equal(fresh[k], after[k]) for k in fresh)
