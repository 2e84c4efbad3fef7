"""The encode stage on a tiny SD pipeline and demo world: parity with diffusers/transformers,
flips, skipped pairs, resume, validation draw, report."""
import json

import numpy as np


def test_smoke(encoded):
    wd, summary, corrupt = encoded
    print(json.dumps(summary, indent=1))
    print(json.loads((wd / "encode" / "encode_report.json").read_text()))
