"""The export writer: diffusers loads what we write (float32 parity with our Flax UNet, fp16 and
bf16 variants, sharded files), our loader reads it back bit-identically, and a pipeline folder
built around the demo base generates an image."""
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from safetensors import safe_open

from fifa_jax.models.diffusers_io import read_config
from fifa_jax.models.safetensors_io import CheckpointMismatchError
from fifa_jax.models.torch_names import fill_from_torch
from fifa_jax.models.unet_io import UNET_RENAMES, abstract_unet, load_unet
from fifa_jax.demo.base import build_demo_base
from fifa_jax.training.export_io import (ExportError, shard_plan, unet_tensors,
                                         write_pipeline_folder, write_unet_folder)

F32 = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_demo_base(tmp_path_factory.mktemp("export") / "base")


@pytest.fixture(scope="module")
def trained(base):
    """The demo UNet with every tensor perturbed (norm weights no longer all 1, biases no
    longer 0), standing in for trained params: a mixed-up name would show."""
    config = read_config(os.path.join(base, "unet"))
    tensors = unet_tensors(load_unet(os.path.join(base, "unet")))
    rng = np.random.default_rng(7)
    tensors = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
               for k, v in sorted(tensors.items())}
    model = fill_from_torch(abstract_unet(config), tensors, UNET_RENAMES, "test")
    return model, config, tensors


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    model, config, _ = trained
    return write_unet_folder(model, config, str(tmp_path_factory.mktemp("unet_out")),
                             variants=("fp16", "bf16"))


@pytest.fixture(scope="module")
def reference(trained):
    """Inputs and our Flax UNet's float32 output on them."""
    model, config, _ = trained
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([3.0, 777.0], np.float32)
    ctx = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32)
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("highest"):
        out = np.asarray(jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, x, t, ctx))
    assert np.abs(out).max() > 0.1
    return (x, t, ctx), out


def torch_out(tmodel, args, dtype=torch.float32):
    x, t, ctx = (torch.from_numpy(a).to(dtype) for a in args)
    with torch.no_grad():
        return tmodel(x, t, ctx).sample.float().numpy()


def state(tmodel) -> dict:
    return {k: v.float().numpy() for k, v in tmodel.state_dict().items()}


def flat(model) -> dict:
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_files_dtypes_and_metadata(exported):
    assert sorted(os.listdir(exported)) == sorted(
        ["config.json", F32, "diffusion_pytorch_model.fp16.safetensors",
         "diffusion_pytorch_model.bf16.safetensors"])
    with open(os.path.join(exported, "config.json")) as f:
        assert json.load(f)["_class_name"] == "UNet2DConditionModel"
    for name, dtype in ((F32, torch.float32), ("diffusion_pytorch_model.fp16.safetensors",
                                               torch.float16),
                        ("diffusion_pytorch_model.bf16.safetensors", torch.bfloat16)):
        with safe_open(os.path.join(exported, name), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}, name


def test_float32_loads_in_diffusers_and_matches_flax(exported, trained, reference):
    _, _, tensors = trained
    tmodel = TorchUNet.from_pretrained(exported).eval()
    sd = state(tmodel)
    assert sd.keys() == tensors.keys()
    for k in sd:
        np.testing.assert_array_equal(sd[k], tensors[k], err_msg=k)
    args, ours = reference
    assert np.abs(torch_out(tmodel, args) - ours).max() < 1e-4


@pytest.mark.parametrize("variant,dtype,npdtype,tol", [
    ("fp16", torch.float16, np.float16, 3e-3),
    ("bf16", torch.bfloat16, ml_dtypes.bfloat16, 2.5e-2)])
def test_low_precision_variant_loads_in_diffusers(exported, trained, reference, variant, dtype,
                                                  npdtype, tol):
    _, _, tensors = trained
    tmodel = TorchUNet.from_pretrained(exported, variant=variant, torch_dtype=dtype).eval()
    assert {p.dtype for p in tmodel.parameters()} == {dtype}
    sd = state(tmodel)
    for k in tensors:  # exactly the round-to-nearest values of our float32 params
        np.testing.assert_array_equal(sd[k], tensors[k].astype(npdtype).astype(np.float32))
    args, ours = reference
    scale = np.abs(ours).max()
    if dtype == torch.bfloat16:  # bf16 compute too, as a bf16 user runs it: rounding shows
        rel = np.abs(torch_out(tmodel, args, dtype) - ours).max() / scale
        assert 0 < rel < 0.1, rel
    # the rounded weights alone, in float32 compute
    rel = np.abs(torch_out(tmodel.float(), args) - ours).max() / scale
    assert 0 < rel < tol, rel


def test_sharded_export_loads_in_diffusers_and_ours(trained, tmp_path):
    model, config, tensors = trained
    out = write_unet_folder(model, config, str(tmp_path), variants=("fp16",),
                            max_shard_bytes=200_000)
    index_name = F32 + ".index.json"
    with open(tmp_path / index_name) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}" \
        ".safetensors"
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for s in shards:        # under the limit, or one tensor that alone exceeds it
        keys = [k for k, f in index["weight_map"].items() if f == s]
        assert os.path.getsize(tmp_path / s) < 200_000 + 20_000 or len(keys) == 1, s
    with open(tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json") as f:
        shards16 = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards16) >= 2 and shards16[0] == "diffusion_pytorch_model.fp16-00001-of-" \
        f"{len(shards16):05d}.safetensors"
    assert not os.path.exists(tmp_path / F32)
    sd = state(TorchUNet.from_pretrained(out).eval())
    for k in tensors:
        np.testing.assert_array_equal(sd[k], tensors[k], err_msg=k)
    sd16 = state(TorchUNet.from_pretrained(out, variant="fp16", torch_dtype=torch.float16))
    for k in tensors:
        np.testing.assert_array_equal(sd16[k], tensors[k].astype(np.float16).astype(np.float32))
    a, b = flat(model), flat(load_unet(out))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # an unsharded float32-only export into the same folder removes the shards, the indexes and
    # the fp16 variant it did not write this time
    write_unet_folder(model, config, out)
    assert sorted(os.listdir(out)) == ["config.json", F32]


def test_shard_plan():
    t = {k: np.zeros(n, np.float32) for k, n in (("a", 10), ("b", 30), ("c", 5), ("d", 5))}
    assert shard_plan(t, None) == [["a", "b", "c", "d"]]
    assert shard_plan(t, 400) == [["a", "b", "c", "d"]]
    assert shard_plan(t, 60) == [["a"], ["b"], ["c", "d"]]  # b (120 bytes) alone, over the limit


def test_tensor_dict_input_is_checked_strictly(trained, exported, tmp_path):
    _, config, tensors = trained
    write_unet_folder(tensors, config, str(tmp_path / "ok"))
    with open(tmp_path / "ok" / F32, "rb") as f, open(os.path.join(exported, F32), "rb") as g:
        assert f.read() == g.read()
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    broken = {k: v for k, v in tensors.items() if k != key}
    with pytest.raises(CheckpointMismatchError, match=key.replace(".", r"\.")):
        write_unet_folder(broken, config, str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="unknown weight variants"):
        write_unet_folder(tensors, config, str(tmp_path / "bad"), variants=("int8",))


def test_pipeline_folder_generates_with_diffusers(base, exported, tmp_path):
    from diffusers import DiffusionPipeline
    out = write_pipeline_folder(base, exported, str(tmp_path / "pipe"))
    assert sorted(os.listdir(out)) == ["model_index.json", "scheduler", "text_encoder",
                                       "tokenizer", "unet", "vae"]
    with open(os.path.join(out, "model_index.json")) as f, \
            open(os.path.join(base, "model_index.json")) as g:
        assert json.load(f) == json.load(g)
    for root, _, files in os.walk(out):
        for name in files:
            assert not os.path.islink(os.path.join(root, name))
    vae = os.path.join("vae", "diffusion_pytorch_model.safetensors")
    assert os.path.samefile(os.path.join(out, vae), os.path.join(base, vae))  # hard link
    assert sorted(os.listdir(os.path.join(out, "unet"))) == sorted(os.listdir(exported))
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    img = pipe("one blue square at the top", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    # a rerun replaces the folder (stale files go) and keeps working
    open(os.path.join(out, "stale.txt"), "w").close()
    write_pipeline_folder(base, exported, out)
    assert not os.path.exists(os.path.join(out, "stale.txt"))
    assert sorted(os.listdir(out)) == ["model_index.json", "scheduler", "text_encoder",
                                       "tokenizer", "unet", "vae"]


def test_pipeline_folder_refuses_missing_component(base, exported, tmp_path):
    broken = shutil.copytree(base, tmp_path / "broken")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(ExportError, match="names component 'tokenizer'"):
        write_pipeline_folder(str(broken), exported, str(tmp_path / "pipe"))
    assert not os.path.exists(tmp_path / "pipe")
    with pytest.raises(ExportError, match="not a diffusers UNet folder"):
        write_pipeline_folder(base, str(tmp_path), str(tmp_path / "pipe"))


def test_unet_tensors_of_a_sharded_model(trained):
    """Params sharded over the 8 test devices (as the trainer holds them) export the same."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    model, _, tensors = trained
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    graphdef, params = nnx.split(model)
    spec = lambda a: P(*([None] * (a.ndim - 1) + ["fsdp"])) if a.ndim and a.shape[-1] % 8 == 0 \
        else P()  # noqa: E731
    sharded = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec(a))), params)
    assert any(len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated
               for a in jax.tree.leaves(sharded))
    got = unet_tensors(nnx.merge(graphdef, sharded))
    assert got.keys() == tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(got[k], tensors[k], err_msg=k)
