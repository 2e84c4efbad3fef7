"""LoRA export (training/lora.py torch_tensors, export_io.write_lora): the file diffusers'
`StableDiffusionPipeline.load_lora_weights` reads gives the PyTorch UNet our policy's output
(base + alpha / r * B @ A, alpha != r) to 1e-4 in float32; a torch merge of the same file
(no PEFT) agrees too; `TextToImage.load(lora_dir=)` (generate --lora) merges it."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from fifa_jax.demo.base import build_demo_base
from fifa_jax.models.diffusers_io import read_config
from fifa_jax.models.unet_io import load_unet
from fifa_jax.training import export_io, lora as lora_lib

CFG = lora_lib.LoraConfig(rank=2, alpha=5.0, targets=(
    lora_lib.DEFAULT_TARGETS, r"ff\.net\.(0\.proj|2)$", r"resnets\.\d+\.conv[12]$"))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(base folder, lora folder, our merged UNet's output, inputs)."""
    root = tmp_path_factory.mktemp("lora_export")
    base = build_demo_base(str(root / "base"))
    unet = load_unet(os.path.join(base, "unet"))
    graphdef, state = nnx.split(unet)
    params = nnx.to_pure_dict(state)
    adapters = lora_lib.init_adapters(params, CFG, jax.random.key(1))
    rng = np.random.default_rng(2)       # trained-looking B (0 at init would test nothing)
    adapters = jax.tree.map(lambda x: x + jnp.asarray(0.2 * rng.standard_normal(x.shape),
                                                      jnp.float32), adapters)
    folder = str(root / "lora")
    export_io.write_lora(folder, lora_lib.torch_tensors(adapters, CFG.scale), {"rank": "2"})
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([3.0, 777.0], np.float32)
    dim = read_config(os.path.join(base, "unet"))["cross_attention_dim"]
    ctx = rng.standard_normal((2, 7, dim)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        merged = lora_lib.merge(adapters, params, CFG.scale)
        ours = np.asarray(jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))(merged, x, t, ctx))
        base_out = np.asarray(jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))(params, x, t,
                                                                                ctx))
    assert np.abs(ours - base_out).max() > 1e-2        # the adapters change the output
    return base, folder, ours, (x, t, ctx), merged


def _torch_out(unet, args):
    x, t, ctx = (torch.from_numpy(a) for a in args)
    with torch.no_grad():
        return unet(x, t, ctx).sample.float().numpy()


def test_file_keys_are_diffusers_peft_names(case):
    _, folder, *_ = case
    tensors = load_file(os.path.join(folder, lora_lib.WEIGHTS_NAME))
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in tensors)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight" \
        in tensors
    assert any(".ff.net.2.lora_B" in k for k in tensors)
    conv = tensors["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"]
    assert conv.ndim == 4 and conv.shape[0] == 2 and conv.shape[2:] == (3, 3)  # (r, in, kh, kw)
    assert tensors["unet.down_blocks.0.resnets.0.conv1.lora_B.weight"].shape[1:] == (2, 1, 1)
    a = tensors["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"]
    assert a.shape[0] == 2                                      # (r, in)


def test_diffusers_load_lora_weights_matches_our_policy(case):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    base, folder, ours, args, _ = case
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None,
                                                   requires_safety_checker=False)
    before = _torch_out(pipe.unet, args)
    pipe.load_lora_weights(folder)
    after = _torch_out(pipe.unet, args)
    assert np.abs(after - before).max() > 1e-2                 # the LoRA is applied
    assert np.abs(after - ours).max() < 1e-4


def test_torch_merge_of_the_file_matches_our_policy(case):
    """Without PEFT: W += B @ A on the diffusers UNet's weights, from the file alone."""
    from diffusers import UNet2DConditionModel
    base, folder, ours, args, _ = case
    unet = UNet2DConditionModel.from_pretrained(os.path.join(base, "unet")).eval()
    sd = unet.state_dict()
    tensors = load_file(os.path.join(folder, lora_lib.WEIGHTS_NAME))
    for k, a in tensors.items():
        if k.endswith(".lora_A.weight"):
            mod = k[len("unet."):-len(".lora_A.weight")]
            b = tensors[k.replace(".lora_A.", ".lora_B.")]
            d = (b @ a if a.ndim == 2 else np.einsum("or,rihw->oihw", b[:, :, 0, 0], a))
            sd[mod + ".weight"] += torch.from_numpy(d)
    unet.load_state_dict(sd)
    assert np.abs(_torch_out(unet, args) - ours).max() < 1e-4


def test_text_to_image_merges_the_lora(case):
    from fifa_jax.sampling.pipeline import TextToImage
    base, folder, _, _, merged = case
    gen = TextToImage.load(base, lora_dir=folder, dtype="float32")
    got = nnx.to_pure_dict(gen.unet_params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(merged)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_a_file_for_another_unet_is_named():
    params = {"attn1": {"to_q": {"kernel": np.zeros((4, 4), np.float32)}}}
    with pytest.raises(Exception, match="unet.attn9.to_q.lora_A.weight"):
        lora_lib.from_torch_tensors({"unet.attn9.to_q.lora_A.weight": np.zeros((2, 4))},
                                    params, "x.safetensors")


def test_export_stage_writes_the_lora_and_the_merged_unet(case, tmp_path):
    """A LoRA run's checkpoint (adapters + optimiser state) -> export/lora (the adapters,
    scale folded into B) and export/unet (base + adapters), which our loader reads back."""
    import ml_collections
    import optax

    from fifa_jax.training import checkpoints, export, train, train_state
    base, _, _, _, _ = case
    params = nnx.to_pure_dict(nnx.split(load_unet(os.path.join(base, "unet")))[1])
    adapters = lora_lib.init_adapters(params, CFG, jax.random.key(3))
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)
    opt = optax.adamw(1e-3)
    state = train_state.TrainState(step=jnp.int32(7), params=adapters,
                                   opt_state=opt.init(adapters),
                                   key=jnp.zeros((2,), jnp.uint32))
    mgr = checkpoints.manager(tmp_path / "train" / "checkpoints", max_to_keep=1,
                              async_save=False)
    checkpoints.save(mgr, state, {"compat": "x"}, force=True)
    mgr.wait_until_finished()
    mgr.close()
    config = ml_collections.ConfigDict({"seed": 0, "train": train.default_config(),
                                        "export": export.default_config()})
    config.train.base_model = base
    config.train.lora.rank, config.train.lora.alpha = CFG.rank, CFG.alpha
    config.train.lora.targets = ",".join(CFG.targets)
    config.export.pipeline = False
    assert export.run(config, tmp_path)["step"] == 7
    tensors = load_file(str(tmp_path / "export" / "lora" / lora_lib.WEIGHTS_NAME))
    assert tensors.keys() == lora_lib.torch_tensors(adapters, CFG.scale).keys()
    merged = lora_lib.merge(adapters, params, CFG.scale)
    got = nnx.to_pure_dict(nnx.split(load_unet(str(tmp_path / "export" / "unet")))[1])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(merged)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_lora_file_has_the_usual_mode_and_metadata(case):
    from safetensors import safe_open
    _, folder, *_ = case
    path = os.path.join(folder, lora_lib.WEIGHTS_NAME)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    with safe_open(path, framework="np") as f:
        assert f.metadata() == {"format": "pt", "fifa_jax.lora_rank": "2"}


def test_sdxl_lora_loader_matches_our_policy(tmp_path):
    """An SDXL-layout UNet (text_time added conditioning): the LoRA file through
    StableDiffusionXLPipeline's loader (lora_state_dict + load_lora_into_unet, what its
    load_lora_weights runs) gives our policy's output."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from tests.training._tiny import TINY_XL
    torch.manual_seed(0)
    tunet = UNet2DConditionModel(**TINY_XL).eval()
    tunet.save_pretrained(str(tmp_path / "unet"))
    unet = load_unet(str(tmp_path / "unet"))
    graphdef, state = nnx.split(unet)
    params = nnx.to_pure_dict(state)
    adapters = lora_lib.init_adapters(params, CFG, jax.random.key(4))
    rng = np.random.default_rng(5)
    adapters = jax.tree.map(lambda x: x + jnp.asarray(0.3 * rng.standard_normal(x.shape),
                                                      jnp.float32), adapters)
    export_io.write_lora(str(tmp_path / "lora"), lora_lib.torch_tensors(adapters, CFG.scale),
                         {})
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    t = np.array([3.0, 777.0], np.float32)
    ctx = rng.standard_normal((2, 5, 6)).astype(np.float32)
    added = {"text_embeds": rng.standard_normal((2, 5)).astype(np.float32),
             "time_ids": np.tile(np.array([32, 32, 0, 0, 32, 32], np.float32), (2, 1))}
    with jax.default_matmul_precision("highest"):
        merged = lora_lib.merge(adapters, params, CFG.scale)
        ours = np.asarray(nnx.merge(graphdef, merged)(x, t, ctx, added_cond_kwargs=added))
    def run():
        with torch.no_grad():
            return tunet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                         added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}
                         ).sample.numpy()
    before = run()
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path / "lora"))
    StableDiffusionXLPipeline.load_lora_into_unet(sd, alphas, unet=tunet)
    theirs = run()
    assert np.abs(theirs - before).max() > 1e-3
    assert np.abs(theirs - ours).max() < 1e-4
    assert any("lora_A" in n for n, _ in tunet.named_parameters())
