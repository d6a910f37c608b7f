"""The export format, defined once: what `xlora-export` writes and every reader reads.

    contract.py     every graph input/output name, dtype, symbolic dimension and companion file name
    record.py       GraphInfo: the graph's metadata record (the `xlora_export` entry of its metadata_props), built by
                    the exporter, serialised, parsed strictly in one place, peeked at leniently before a graph opens
    sidecar.py      a TensorRT engine's sidecar `OUT.engine.json` (the record and the engine's profiles)
    graph_file.py   an ONNX file's metadata_props and its table of external weights, read without loading the graph

The modules import the standard library and each other only: the exporter, the session, the backends and the
commands import them, never the other way.
"""
