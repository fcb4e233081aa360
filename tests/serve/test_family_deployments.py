"""One family deployment (SD 1.5, tiny models) under a real local Ray + Serve: requests routed
by multiplexed model id through a DeploymentHandle.

Ray is started with address="local" (always a new cluster, never one someone else started on
this machine); its GCS then takes a free port, not 6379 (Redis's here). Serve runs without HTTP
proxies: the handle is all this needs, and port 8000 stays free for the ingress tests. Ray 2.60
turns token auth on for the cluster it starts and hands the token to this process itself, so no
RAY_AUTH_MODE setting is needed. Shutdown: serve.shutdown() then ray.shutdown(), never `ray stop`.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

# diffusers' schedulers trip numpy 2's __array__/__array_wrap__ deprecations on every step.
pytestmark = [pytest.mark.serve, pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")]

MODELS = [
    {"name": "tiny-sd15", "family": "stable_diffusion_1", "weights": {"kind": "builtin", "path": "tiny-sd15"}},
    {"name": "tiny-sd15-b", "family": "stable_diffusion_1", "weights": {"kind": "builtin", "path": "tiny-sd15"}},
]
JOB = dict(model="tiny-sd15", prompt="a photo of a cat", negative_prompt="", width=128, height=64, steps=4,
           cfg_scale=7.0, sampler_name="k_dpmpp_2m", karras=True, clip_skip=1, seeds=[1, 2], tiling=False)


@pytest.fixture(scope="module")
def handle():
    import ray
    from ray import serve

    from cluster.app import family_deployments
    from models.catalog import Family

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        serve.start(proxy_location="Disabled")
        yield serve.run(family_deployments()[Family.stable_diffusion_1].bind(MODELS), name="family-test", route_prefix=None)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def pixels(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), np.int16)


def call(handle, job: dict, model_id: str | None = None) -> dict:
    return handle.options(multiplexed_model_id=model_id or job["model"]).generate.remote(job).result(timeout_s=180)


@pytest.mark.timeout(300)
def test_generate_through_a_multiplexed_handle(handle):
    import ray

    reply = call(handle, JOB)
    assert reply["seeds"] == [1, 2] and len(reply["images"]) == 2
    for blob in reply["images"]:
        image = Image.open(io.BytesIO(blob))
        assert image.format == "WEBP" and image.size == (128, 64)
    assert reply["node_id"] == ray.get_runtime_context().get_node_id()
    assert "sd15" in reply["replica"] and reply["seconds"] > 0
    # Deterministic across calls: same job, same bytes.
    assert call(handle, JOB)["images"] == reply["images"]
    # And the same images the generator makes in this process (thread counts may differ from
    # the replica's, which can move a pixel by a level or two after WebP).
    from deployments.diffusion.common import encode_webp
    from deployments.diffusion.deployment import SD15Generator

    gen = SD15Generator(MODELS, device="cpu")
    local = [encode_webp(im) for im in gen.generate(gen.load("tiny-sd15"), JOB)]
    for remote_blob, local_blob in zip(reply["images"], local):
        diff = np.abs(pixels(remote_blob) - pixels(local_blob))
        assert diff.mean() < 0.5, diff.mean()


@pytest.mark.timeout(300)
def test_second_model_on_the_same_replica(handle):
    a = call(handle, JOB)
    b = call(handle, {**JOB, "model": "tiny-sd15-b"})
    assert a["replica"] == b["replica"]
    assert a["images"] == b["images"]  # same builtin weights, same seeds
    # The other spellings of a multiplexed call in Ray 2.60 reach the same method.
    c = handle.generate.options(multiplexed_model_id="tiny-sd15").remote(JOB).result(timeout_s=180)
    d = handle.options(method_name="generate", multiplexed_model_id="tiny-sd15").remote(JOB).result(timeout_s=180)
    assert c["images"] == d["images"] == a["images"]


@pytest.mark.timeout(300)
def test_bad_requests_fail(handle):
    with pytest.raises(Exception, match="routed for model"):
        call(handle, JOB, model_id="tiny-sd15-b")
    with pytest.raises(Exception, match="not one of"):
        call(handle, {**JOB, "model": "no-such-model"})


@pytest.mark.timeout(300)
def test_refused_jobs_arrive_as_job_rejected(handle):
    """What the dispatcher faults at once without retrying: a job the deployment refuses for
    its input comes back through Serve as JobRejected (Ray's error is also the cause's type);
    anything else does not."""
    from deployments.jobs import is_rejection
    from deployments.jobs import JobRejected

    with pytest.raises(JobRejected, match="source_image") as refused:
        call(handle, {**JOB, "workflow": "img2img", "source_image": b"GIF89a not an image"})
    assert is_rejection(refused.value)
    with pytest.raises(JobRejected, match=r"params.loras\[0\]"):
        call(handle, {**JOB, "loras": [{"name": "not-in-the-catalog"}]})
    assert not is_rejection(RuntimeError("replica died"))
