"""Build hook for the one optional C extension, onionp2p.proto._cgo_native (CGO per-cell crypto).

Everything else is in pyproject.toml. The extension is ``optional``: without a C compiler, Python
headers or OpenSSL's headers and libcrypto (Debian: build-essential, python3-dev, libssl-dev),
``pip install`` still succeeds and onionp2p/proto/cgo.py runs its pure-Python CGO with one
RuntimeWarning (specs/cgo.md §8a).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "onionp2p.proto._cgo_native",
            sources=["onionp2p/proto/_cgo_native.c"],
            libraries=["crypto"],  # OpenSSL libcrypto: AES-128 through EVP
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-fno-strict-aliasing"],
            optional=True,
        )
    ],
)
