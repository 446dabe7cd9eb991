"""The committed stubs are exactly what protos/generate.py makes, and our protos are
wire-compatible with Triton's (as shipped in tritonclient)."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys

from google.protobuf.descriptor import FieldDescriptor
from helpers import REPO_ROOT

from protos.generate import generate
from serving.generated.inference import grpc_service_pb2, model_config_pb2
from serving.generated.mnist37.v1 import classifier_pb2

COMMITTED = REPO_ROOT / "serving" / "generated"

# Runs in a subprocess: tritonclient's stubs and ours both define `inference.*` in
# protobuf's default descriptor pool, which refuses the second definition.
_DUMP_TRITON = """
import json
from tritonclient.grpc import model_config_pb2, service_pb2
def fields(message, prefix, out):
    for field in message.fields:
        kind = field.message_type.full_name if field.message_type else field.type
        kind = field.enum_type.full_name if field.enum_type else kind
        out[prefix + message.name + "." + field.name] = [field.number, str(kind), field.label]
    for nested in message.nested_types:
        fields(nested, prefix + message.name + ".", out)
out = {}
for module in (service_pb2, model_config_pb2):
    for message in module.DESCRIPTOR.message_types_by_name.values():
        fields(message, "", out)
service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
methods = {m.name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods}
print(json.dumps({"fields": out, "methods": methods}))
"""


def _our_fields(message, prefix: str, out: dict) -> None:
    for field in message.fields:
        kind = field.message_type.full_name if field.message_type else field.type
        kind = field.enum_type.full_name if field.enum_type else kind
        out[prefix + message.name + "." + field.name] = [field.number, str(kind), field.label]
    for nested in message.nested_types:
        _our_fields(nested, prefix + message.name + ".", out)


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    output = tmp_path / "generated"
    generate(output)
    comparison = filecmp.dircmp(output, COMMITTED, ignore=["__pycache__"])

    def differences(node) -> list[str]:
        found = node.left_only + node.right_only + node.diff_files + node.funny_files
        for sub in node.subdirs.values():
            found += differences(sub)
        return found

    assert differences(comparison) == []
    for path in output.rglob("*.py"):
        assert (COMMITTED / path.relative_to(output)).read_bytes() == path.read_bytes()


def test_stub_imports_are_package_relative():
    for path in COMMITTED.rglob("*.py*"):
        text = path.read_text()
        assert "from inference import" not in text, path
        assert "from mnist37.v1 import" not in text, path


def test_wire_compatible_with_triton():
    dumped = subprocess.run(
        [sys.executable, "-c", _DUMP_TRITON], capture_output=True, text=True, check=True
    )
    triton = json.loads(dumped.stdout)
    ours: dict = {}
    for module in (grpc_service_pb2, model_config_pb2):
        for message in module.DESCRIPTOR.message_types_by_name.values():
            _our_fields(message, "", ours)
    assert ours, "no fields found"
    mismatches = {
        name: (spec, triton["fields"].get(name))
        for name, spec in ours.items()
        if triton["fields"].get(name) != spec
    }
    assert mismatches == {}
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        assert triton["methods"][method.name] == [
            method.input_type.full_name,
            method.output_type.full_name,
        ]
    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
    required = {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
    }
    assert required <= {method.name for method in service.methods}


def test_classifier_api_shape():
    service = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"]
    assert service.full_name == "mnist37.v1.Classifier"
    image = classifier_pb2.Image.DESCRIPTOR
    assert [field.name for field in image.oneofs_by_name["data"].fields] == ["pixels", "png"]
    assert image.fields_by_name["pixels"].type == FieldDescriptor.TYPE_BYTES
