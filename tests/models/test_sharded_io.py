"""Loaders that place every parameter straight into its NamedSharding, and saving sharded models.

On 8 CPU devices (tests/conftest.py): a diffusers UNet loaded with `mesh=` has exactly the
shardings `param_shardings` decides (a conv kernel split on its largest divisible dim, biases
whole), every parameter went through `put_global` with a NamedSharding (no default-device
copy), values equal the unsharded load bit for bit, the forward equals the unsharded model's,
and save -> reload reproduces the checkpoint bit for bit. The pipeline loader shards its UNet,
VAE and text encoder the same way; without a mesh nothing changes.
"""
import jax
import numpy as np
import pytest
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file

from fifa_jax.models import cpu_kernels, torch_names
from fifa_jax.models.pipeline import load_pipeline
from fifa_jax.models.unet_io import load_unet, save_unet
from fifa_jax.parallel.param_sharding import describe, param_shardings
from tests.models.test_param_sharding import TINY
from tests.models.test_pipeline import sd_folder  # noqa: F401  (a fixture)
from tests.models.test_unet_parity import randomize

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _mesh(data, fsdp):
    if len(jax.devices()) < data * fsdp:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
    return Mesh(np.array(jax.devices()[:data * fsdp]).reshape(data, fsdp), ("data", "fsdp"))


def _flat(model) -> dict:
    return {".".join(map(str, k)): v.get_value()
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    """A random one-level diffusers UNet (channels 16: divisible by the fsdp sizes 4 and 8)."""
    tmodel = randomize(TorchUNet(**TINY), seed=5)
    path = tmp_path_factory.mktemp("sharded_unet")
    tmodel.save_pretrained(path)
    return str(path), {k: v.numpy() for k, v in tmodel.state_dict().items()}


def test_sharded_load_places_each_param_and_matches_unsharded(unet_dir, monkeypatch):
    path, _ = unet_dir
    mesh = _mesh(2, 4)
    placed = []
    real = torch_names.put_global

    def recording(arr, sharding):
        placed.append(sharding)
        return real(arr, sharding)

    monkeypatch.setattr(torch_names, "put_global", recording)
    # XLA's forms throughout, so that the forward below stays batch-sharded: our CPU kernels
    # (attention, convolutions, linear weight gradients) are custom calls that XLA does not
    # partition (it gathers their operands onto every device: same values, repeated work).
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    model = load_unet(path, attention_impl="xla", mesh=mesh)
    plain = load_unet(path, attention_impl="xla")
    got, want = _flat(model), _flat(plain)
    assert len(placed) == len(got) and all(isinstance(s, NamedSharding) and s.mesh == mesh
                                           for s in placed)
    expected = describe(param_shardings(nnx.state(model, nnx.Param), mesh))
    assert {k: str(v.sharding.spec) for k, v in got.items()} == expected
    conv = got["down_blocks.0.resnets.0.conv1.kernel"]
    assert conv.sharding.spec == P(None, None, None, "fsdp")       # (3, 3, 16, 16): O split
    assert {s.data.shape for s in conv.addressable_shards} == {(3, 3, 16, 4)}
    assert got["down_blocks.0.resnets.0.conv1.bias"].sharding.spec == P()
    assert got["conv_norm_out.scale"].sharding.spec == P()
    assert sum(v.sharding.spec != P() for v in got.values()) > len(got) // 3
    # unsharded: one device, exactly as before
    assert all(len(v.sharding.device_set) == 1 for v in want.values())
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4, 4, 4)).astype(np.float32)
    t = rng.uniform(0, 1000, (8,)).astype(np.float32)
    ctx = rng.standard_normal((8, 5, 12)).astype(np.float32)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c))
    with jax.default_matmul_precision("highest"):
        out = fwd(state, *(jax.device_put(a, batch) for a in (x, t, ctx)))
        ref = fwd(nnx.split(plain)[1], x, t, ctx)
    assert out.sharding.spec != P() and ref.sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5)


@pytest.mark.parametrize("data,fsdp", [(1, 8), (2, 4)])
def test_save_sharded_reloads_bit_for_bit(unet_dir, tmp_path, data, fsdp):
    path, torch_sd = unet_dir
    mesh = _mesh(data, fsdp)
    model = load_unet(path, mesh=mesh)
    assert any(not v.is_fully_replicated for v in _flat(model).values())
    save_unet(model, str(tmp_path))
    written = load_file(str(tmp_path / WEIGHTS))
    assert written.keys() == torch_sd.keys()
    for k, v in torch_sd.items():
        np.testing.assert_array_equal(written[k], v, err_msg=k)
    again, orig = _flat(load_unet(str(tmp_path), mesh=mesh)), _flat(model)
    assert again.keys() == orig.keys()
    for k in orig:
        assert again[k].sharding == orig[k].sharding, k
        np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(orig[k]), err_msg=k)


def test_pipeline_loads_sharded(sd_folder):  # noqa: F811
    root, ref = sd_folder
    mesh = _mesh(1, 8)
    rules = ((r"(^|\.)(bias|scale)$", "replicate"), (r"^conv_in\.", "replicate"), (".*", "fsdp"))
    pipe = load_pipeline(str(root), components=("unet", "vae", "text_encoder"), mesh=mesh,
                         rules=rules)
    plain = load_pipeline(str(root), components=("unet", "vae", "text_encoder"))
    for name in ("unet", "vae", "text_encoder"):
        got, want = _flat(getattr(pipe, name)), _flat(getattr(plain, name))
        expected = describe(param_shardings(nnx.state(getattr(pipe, name), nnx.Param), mesh,
                                            rules=rules))
        assert {k: str(v.sharding.spec) for k, v in got.items()} == expected, name
        assert sum(v.sharding.spec != P() for v in got.values()) > len(got) // 4, name
        assert got.keys() == want.keys()
        for k in got:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]),
                                          err_msg=f"{name}.{k}")
    unet = _flat(pipe.unet)
    assert unet["conv_in.kernel"].sharding.spec == P()                   # the extra rule
    assert unet["conv_out.kernel"].sharding.spec != P()
    tok = _flat(pipe.text_encoder)["embeddings.token_embedding.embedding"]
    assert tok.shape == (57, 32) and tok.sharding.spec == P(None, "fsdp")
    want = [v.numpy() for k, v in ref["text_encoder"].state_dict().items()
            if k.endswith("token_embedding.weight")]
    assert len(want) == 1          # the text encoder still holds transformers' weights
    np.testing.assert_array_equal(np.asarray(tok), want[0])
