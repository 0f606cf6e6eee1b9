"""The one compiled piece of dynamo-ext: ``dynamo_ext._native`` (dynamo_ext/_native.c), the
router's hot loops in plain CPython C. Everything else is in pyproject.toml.

``optional=True``: a machine without a C compiler or Python headers still installs; the
router then runs its pure-Python reference (dynamo_ext/native.py logs a warning and the
router exports ``dynamo_ext_router_native 0``)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dynamo_ext._native",
            sources=["dynamo_ext/_native.c"],
            extra_compile_args=["-O3", "-std=c99", "-Wall"],
            optional=True,
        )
    ]
)
