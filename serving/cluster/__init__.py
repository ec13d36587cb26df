"""deltaserve beyond one machine: engine replicas on Ray Serve behind one ingress, routed by adapter.

    HTTP -> Ray Serve's proxy -> Ingress (serving.cluster.ingress: the same FastAPI app, auth, tenants, uploads and
            errors as one server; its generation is a ClusterGeneration)
         -> EngineReplica x N (serving.cluster.replica: an engine, its host tier and GPU slots; each request's
            delta is loaded there from the shared blob store, by reference)

A request for an adapter carries its delta's key as Ray Serve's multiplexed model id, so Ray routes it to a replica
that already holds that delta (and elsewhere when those are busy). Versions deleted or replaced are announced on a
Board (a Ray actor) every replica reads, and replicas report their engine metrics there for the ingress's /metrics.
"""
