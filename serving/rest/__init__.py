"""The HTTP edge: the Open Inference Protocol's REST API (KServe v2 with Triton's extensions)
and the domain API (`/v1/classify`, `/v1/explain`), on aiohttp in the same event loop as
grpc.aio.

It serves the same `DataPlane` (so HTTP and gRPC requests join the same batches), shares
the gRPC servicers' `EdgeState` (in-flight count, drain, failure-log limit) and answers with
the same facts (`serving.catalog`) and the same error map (`serving.edge.STATUS`). Protocol
code only: JSON and binary tensors in and out, bodies read within limits.

- `server`: `HttpSettings` and `HttpServer` (routes, token check, start and stop);
- `edge`: `HttpCall`, each request's `EdgeCall`, and reading and answering bodies;
- `oip`: the `/v2` endpoints; `tensors`: their JSON and binary tensors;
- `classify`: `/v1/classify` and `/v1/explain`; `messages`: OIP messages as JSON;
  `fields`: reading a JSON body member by member, each refusal naming its field.
"""
