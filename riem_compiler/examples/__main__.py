"""`python -m riem_compiler.examples` prints the path of the bundled digits CNN (.onnx)."""
from riem_compiler.examples import path

print(path())
