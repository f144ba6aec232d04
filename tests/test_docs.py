"""The examples users copy: each public function's docstring example and README.md's Python
code run as written, and show what they print."""

import contextlib
import doctest
import io
import os
import re

import numpy as np
import pytest
import torch

import mmsd_ext
from mmsd_ext import distill, evaluate, localize, mil, nms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cpu = pytest.mark.skipif("cpu" not in mmsd_ext.available_backends(), reason="the compiled extension is not built")


# The functions each module must show an example of: every public op and evaluation function.
EXAMPLES = {
    distill: {"snippet_distill_loss", "mmsd_distill_loss"},
    mil: {"topk_mil_pool", "mil_k"},
    nms: {"temporal_nms", "soft_temporal_nms"},
    localize: {"mmsd_proposals", "pad_cas"},
    evaluate: {"detection_map", "thumos14_detection_map", "mmsd_detection_map", "classification_map",
               "export_detections_json"},
}


@needs_cpu
@pytest.mark.parametrize("module", list(EXAMPLES), ids=lambda m: m.__name__)
def test_docstring_examples_run_and_print_what_they_show(module):
    globs = {"torch": torch, "np": np, "mmsd_ext": mmsd_ext}
    tests = [t for t in doctest.DocTestFinder().find(module, globs=globs) if t.examples]
    assert EXAMPLES[module] <= {t.name.rsplit(".", 1)[-1] for t in tests}
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, "".join(report)


def _readme_python_blocks():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


@needs_cpu
def test_readme_python_code_runs():
    blocks = _readme_python_blocks()
    assert blocks, "README.md has no Python example"
    for block in blocks:
        namespace = {}
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(block, "README.md", "exec"), namespace)
        # What the README says its example gives.
        if "keep" in namespace:
            assert namespace["keep"].tolist() == [0, 2]
        if "build_info" in block:
            assert "backends" in printed.getvalue()
