"""The contract server and clients agree on byte for byte.

`tributary.proto` and its generated stubs (`tributary_pb2*`, never edited by hand),
and `tensors`, the codec that turns named numpy arrays into a header plus raw
little-endian chunks of at most 1 MiB and back.
"""
