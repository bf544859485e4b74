"""Build hook: generates the public API's stubs into src/switchyard_client/proto/ before setuptools runs.

Only `switchyard/api/v1/generation.proto` is compiled (the scheduler and worker protos are internal).
It runs whenever the repository's protos/ is next to this directory, which is the case for
`pip install ./clients/python`, `pip wheel ./clients/python` and `python -m build clients/python`, so
the stubs always match the protos the wheel is built from. A build from an sdist (no protos/ beside
it) uses the stubs the sdist carries. The generated `*_grpc.py` imports its `*_pb2` by the proto's
package path (`from switchyard.api.v1 import ...`); that import is rewritten to a relative one, so the
client does not claim the top-level name `switchyard` (the repository's own stubs use it) and two
copies never shadow each other.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "protos"
PROTO = "switchyard/api/v1/generation.proto"
OUT = HERE / "src" / "switchyard_client" / "proto"
GENERATED = ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py")
INIT = '''"""Generated from protos/switchyard/api/v1/generation.proto by the package's build (not committed).

`generation_pb2` holds the messages, `generation_pb2_grpc` the `GenerationStub` (and the servicer
base class); use them directly for anything the typed client does not cover.
"""

from . import generation_pb2, generation_pb2_grpc

__all__ = ["generation_pb2", "generation_pb2_grpc"]
'''


def generate() -> None:
    from grpc_tools import protoc  # noqa: PLC0415 - a build requirement, present only while building

    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={tmp}",
                            f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(PROTO_ROOT / PROTO)])
        if code != 0:
            sys.exit(f"protoc failed on {PROTO_ROOT / PROTO} (exit {code})")
        produced = Path(tmp) / Path(PROTO).parent
        if OUT.exists():
            shutil.rmtree(OUT)
        OUT.mkdir(parents=True)
        for name in GENERATED:
            text = (produced / name).read_text(encoding="utf-8")
            text = re.sub(r"^from switchyard\.api\.v1 import ", "from . import ", text, flags=re.MULTILINE)
            (OUT / name).write_text(text, encoding="utf-8")
    shutil.copyfile(PROTO_ROOT / PROTO, OUT / "generation.proto")
    (OUT / "__init__.py").write_text(INIT, encoding="utf-8")


if (PROTO_ROOT / PROTO).is_file():
    generate()
elif not all((OUT / name).is_file() for name in GENERATED):
    sys.exit(f"neither {PROTO_ROOT / PROTO} nor generated stubs in {OUT}: build from the repository "
             "(pip install ./clients/python) or from an sdist made there")

setup()
