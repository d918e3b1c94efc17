"""Stand-in for transformers' `tests/exporters/test_export.py` (not in the sdist).

`ModelTesterMixin` inherits `ExportTesterMixin` for its `torch.export` tests; those are not run for this family
(export is not a supported path of it), so the mixin adds no tests.
"""


class ExportTesterMixin:
    pass
