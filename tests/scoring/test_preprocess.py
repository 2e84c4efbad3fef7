"""Our CLIP preprocessing == transformers' CLIP image processor on odd-sized random images."""
import json

import numpy as np
import pytest
from PIL import Image

from fifa_jax.scoring import preprocess as pp

PICKSCORE_STYLE = {  # the legacy int form used by laion/CLIP-ViT-H-14 and PickScore
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": list(pp.OPENAI_CLIP_MEAN), "image_std": list(pp.OPENAI_CLIP_STD),
    "resample": 3, "size": 224}
DICT_STYLE = {  # the current dict form, other sizes and filter, non-default mean/std
    "crop_size": {"height": 40, "width": 56}, "do_center_crop": True, "do_normalize": True,
    "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True,
    "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "resample": 2,
    "size": {"shortest_edge": 48}, "image_processor_type": "CLIPImageProcessor"}
SMALL_CROP_BIGGER = dict(DICT_STYLE, size={"shortest_edge": 30})  # crop larger than image


def _reference_processor(cfg: dict):
    try:  # transformers >= 5 splits backends; the PIL one needs no torchvision
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:
        from transformers import CLIPImageProcessor as Proc
    kwargs = {k: v for k, v in cfg.items() if k not in ("feature_extractor_type",
                                                        "image_processor_type")}
    return Proc(**kwargs)


def _images(rng):
    sizes = [(37, 53), (301, 97), (224, 224), (19, 250), (225, 223)]
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    rgba = rng.integers(0, 256, (61, 45, 4), dtype=np.uint8)
    out.append(Image.fromarray(rgba, mode="RGBA"))
    out.append(Image.fromarray(rng.integers(0, 256, (33, 71), dtype=np.uint8), mode="L"))
    return out


@pytest.mark.parametrize("cfg", [PICKSCORE_STYLE, DICT_STYLE, SMALL_CROP_BIGGER],
                         ids=["pickscore", "dict", "pad"])
def test_matches_transformers(cfg, tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(cfg))
    ours_cfg = pp.load_config(str(tmp_path))
    ref = _reference_processor(cfg)
    for img in _images(np.random.default_rng(0)):
        want = ref(images=img, return_tensors="np")["pixel_values"][0]
        got = pp.preprocess(img, ours_cfg)
        assert got.shape == want.shape == (3,) + ours_cfg.out_hw
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        # the split path: uint8 crop on the host, normalisation on the device
        dev = np.asarray(pp.normalize(pp.resize_and_crop(img, ours_cfg)[None], ours_cfg))[0]
        np.testing.assert_allclose(dev, want, atol=1e-5, rtol=0)


def test_resize_rule_truncates_long_side():
    assert pp.resize_output_hw(301, 97, 224) == (int(224 * 301 / 97), 224)
    assert pp.resize_output_hw(97, 301, 224) == (224, int(224 * 301 / 97))


def test_bad_config_names_file(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"width": 3}}))
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        pp.load_config(str(tmp_path))
