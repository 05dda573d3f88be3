"""The contracts (proto/) as other tools see them: the Open Inference Protocol file speaks Triton's wire
format, every file names its package for other generators, and times travel as Timestamps."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"

# tritonclient's grpc_service_pb2 and our grpc_predict_v2_pb2 both define package `inference`; one process
# cannot import both (protobuf's default pool refuses the second), so each side runs in its own interpreter.
_FIELDS = """
import json, sys
from {module} import {name} as pb
fields = {{}}
def walk(message, prefix=""):
    fields[prefix + message.name] = {{f.name: [f.number, f.type] for f in message.fields}}
    for nested in message.nested_types:
        walk(nested, prefix + message.name + ".")
for message in pb.DESCRIPTOR.message_types_by_name.values():
    walk(message)
json.dump(fields, sys.stdout)
"""

_ENCODE_TRITON = """
import json, sys
from tritonclient.grpc import service_pb2 as pb
out = [pb.InferParameter(**{k: v}).SerializeToString().hex() for k, v in json.load(sys.stdin)]
json.dump(out, sys.stdout)
"""

_DECODE_OURS = """
import json, sys
from latentwire.inference.v2 import grpc_predict_v2_pb2 as pb
out = []
for data in json.load(sys.stdin):
    parameter = pb.InferParameter.FromString(bytes.fromhex(data))
    kind = parameter.WhichOneof("parameter_choice")
    out.append([kind, getattr(parameter, kind)])
json.dump(out, sys.stdout)
"""

_ENCODE_OURS = _ENCODE_TRITON.replace("from tritonclient.grpc import service_pb2 as pb",
                                      "from latentwire.inference.v2 import grpc_predict_v2_pb2 as pb")
_DECODE_TRITON = _DECODE_OURS.replace("from latentwire.inference.v2 import grpc_predict_v2_pb2 as pb",
                                      "from tritonclient.grpc import service_pb2 as pb")


def _python(code: str, payload=None):
    completed = subprocess.run([sys.executable, "-c", code], input=json.dumps(payload), capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


PARAMETERS = [["bool_param", True], ["int64_param", -(2**40)], ["string_param", "top"],
              ["double_param", 0.125], ["uint64_param", 2**64 - 1]]


def test_infer_parameter_decodes_what_tritonclient_encodes():
    pytest.importorskip("tritonclient.grpc")
    assert _python(_DECODE_OURS, _python(_ENCODE_TRITON, PARAMETERS)) == PARAMETERS
    assert _python(_DECODE_TRITON, _python(_ENCODE_OURS, PARAMETERS)) == PARAMETERS


def test_every_inference_field_has_tritons_number_and_type():
    pytest.importorskip("tritonclient.grpc")
    ours = _python(_FIELDS.format(module="latentwire.inference.v2", name="grpc_predict_v2_pb2"))
    triton = _python(_FIELDS.format(module="tritonclient.grpc", name="service_pb2"))
    assert ours["InferParameter"] == {"bool_param": [1, 8], "int64_param": [2, 3], "string_param": [3, 9],
                                      "double_param": [4, 1], "uint64_param": [5, 4]}
    differ = [f"{message}.{field}: ours {number}, Triton's {triton.get(message, {}).get(field)}"
              for message, fields in ours.items() for field, number in fields.items()
              if triton.get(message, {}).get(field) != number]
    assert not differ, differ


# Ours only: proto/google holds googleapis' files, vendored unchanged (buf.yaml).
@pytest.mark.parametrize("path", sorted((PROTO_ROOT / "latentwire").rglob("*.proto")),
                         ids=lambda p: str(p.relative_to(PROTO_ROOT)))
def test_every_proto_names_its_package_for_other_generators(path):
    text = path.read_text()
    package = re.search(r"^package ([\w.]+);", text, re.M).group(1)
    folder = path.parent.relative_to(PROTO_ROOT / "latentwire")  # e.g. text_encoder/v1 (inference/v2 too)
    service, version = folder.parts
    options = {m[1]: m[2] if m[2] is not None else m[3]
               for m in re.finditer(r'^option (\w+) = (?:"([^"]*)"|(\w+));', text, re.M)}
    go_name = service.replace("_", "") + version
    assert options.get("go_package") == f"github.com/latentwire/latentwire/gen/go/latentwire/{folder};{go_name}"
    assert options.get("java_package") == f"dev.latentwire.{service}.{version}"
    assert options.get("java_multiple_files") == "true"
    assert options.get("csharp_namespace", "").lower() == f"latentwire.{service.replace('_', '')}.{version}", package


def test_service_job_status_carries_start_and_end_timestamps():
    from latentwire.common.v1 import status_pb2
    from services.runtime.jobs import JobTracker

    tracker = JobTracker(max_active=1)
    before = time.time()
    job = tracker.start("job-1")
    running = job.to_proto()
    assert running.HasField("start_time") and not running.HasField("end_time")
    tracker.finish(job, status_pb2.JOB_STATE_SUCCEEDED)
    finished = tracker.snapshot()[1][0]
    start, end = finished.start_time.ToNanoseconds() / 1e9, finished.end_time.ToNanoseconds() / 1e9
    assert before - 1e-3 <= start <= end <= time.time() + 1e-3
    assert finished.state == status_pb2.JOB_STATE_SUCCEEDED
