"""The demo world and everything made for it, in one place.

    world.py        the seeded Pick-a-Pic-layout preference dataset (true rewards known)
    base.py, reward.py, shipped.py   the pretrained SD1.5-layout base and CLIP-layout reward
                    shipped in models/, and their installation into a work directory
    build_models.py (train_vae.py, train_clip.py, train_unet.py, world_data.py, loop.py,
                    measure.py)      how the shipped models were trained and measured
    oracle.py       the true reward of any image, measured from its pixels
    study.py        the `study` stage: every selection method, trained and evaluated
    assets.py       the one module the pipeline's stages import for the demo
"""
