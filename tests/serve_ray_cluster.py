"""Driver of test_serve.py::test_ray_serve_on_a_two_node_cluster, run inside a private network namespace (only
loopback up): a simulated 2-node Ray cluster (`ray.cluster_utils.Cluster`, one CPU per node), xlora-serve deployed
with `serve run` from deploy/ray/serve_config.yaml (two replicas, one per node, the consistent-hash router), then
HTTP traffic through Ray's proxy on 127.0.0.1. Prints one JSON object of observations (which replica answered each
turn, its tokens, how many prompt tokens came from cached state); test_serve.py judges them. Nothing here relies
on which replica a turn lands on: the router's affinity is best effort.

    python tests/serve_ray_cluster.py GRAPH.onnx PORT

Ray's files go to a temporary RAY_TMPDIR (removed at the end): nothing is needed or left in /tmp/ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import ray
import yaml
from ray import serve
from ray.cluster_utils import Cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORE = 80 << 20  # object store per node: the smallest Ray accepts; nothing large travels through it


def config(graph: str, port: int, folder: str) -> str:
    """The shipped config, bound to this cluster: the graph, loopback, two fixed replicas of one CPU each."""
    with open(os.path.join(ROOT, "deploy", "ray", "serve_config.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["proxy_location"] = "HeadOnly"  # one proxy: both simulated nodes share the address
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    [app] = cfg["applications"]
    app["args"].update(graph=graph, threads=1, max_batch=8, max_queue=8)
    [deployment] = app["deployments"]
    deployment.pop("autoscaling_config")
    deployment.update(num_replicas=2, ray_actor_options={"num_cpus": 1})
    path = os.path.join(folder, "serve_config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def main() -> None:
    temp = tempfile.mkdtemp(prefix="xlora-ray-")  # the config and Ray's files (not /tmp/ray)
    os.environ["RAY_TMPDIR"] = temp  # also for the processes started below
    os.makedirs(os.path.join(temp, "ray"))
    try:
        observe(sys.argv[1], int(sys.argv[2]), temp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def observe(graph: str, port: int, temp: str) -> None:
    """Start the cluster and the application, send the traffic, print the observations, shut everything down."""
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=False,
                                                                object_store_memory=STORE))
    try:
        traffic(graph, port, temp, cluster, t0)
    finally:
        ray.shutdown()
        cluster.shutdown()


def traffic(graph: str, port: int, temp: str, cluster: Cluster, t0: float) -> None:
    cluster.add_node(num_cpus=1, object_store_memory=STORE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
    subprocess.run([serve_cli, "run", "--address", cluster.address, "--non-blocking", config(graph, port, temp)],
                   check=True, capture_output=True, timeout=120)
    while serve.status().applications.get("xlora") is None or \
            serve.status().applications["xlora"].status != "RUNNING":
        assert time.monotonic() - t0 < 240, "the application did not start"
        time.sleep(0.5)
    started = time.monotonic() - t0
    # each node has one CPU and each replica takes one: both nodes host a replica once no CPU is left
    cpus = dict(total=ray.cluster_resources().get("CPU"), free=ray.available_resources().get("CPU", 0.0),
                nodes=len([n for n in ray.nodes() if n["Alive"]]))
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)  # generous: the machine may be loaded

    def chat(messages: list[dict], session: str, **body) -> tuple[dict, str]:
        body = dict(dict(messages=messages, max_tokens=8, temperature=0, xlora=dict(return_token_ids=True)), **body)
        r = client.post("/v1/chat/completions", headers={"x-session-id": session}, json=body)
        assert r.status_code == 200, r.text
        return r.json(), r.headers["x-xlora-instance"]

    # interleaved sessions: first turns at once, then second turns at once
    sessions = [f"session-{i}" for i in range(6)]
    conversations = {s: [{"role": "user", "content": f"question {i}: what does expert {i} learn?"}]
                     for i, s in enumerate(sessions)}
    turns: dict[str, list] = {s: [] for s in sessions}
    errors: list[str] = []

    def turn(session: str) -> None:
        try:
            response, instance = chat(conversations[session], session)
        except Exception as e:  # reported, not lost with the thread
            errors.append(f"{session}: {type(e).__name__}: {e}")
            return
        turns[session].append(dict(instance=instance, tokens=response["choices"][0]["xlora"]["token_ids"],
                                   cached=response["usage"]["prompt_tokens_details"]["cached_tokens"],
                                   messages=list(conversations[session])))
        conversations[session] += [{"role": "assistant", "content": response["choices"][0]["message"]["content"]},
                                   {"role": "user", "content": "and then?"}]

    for _ in range(2):
        threads = [threading.Thread(target=turn, args=(s,)) for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # session-0's second turn again under new session ids (nothing cached for them anywhere), until both replicas
    # have answered it: the same tokens on each
    probes = []
    if len(turns[sessions[0]]) == 2:
        messages = turns[sessions[0]][1]["messages"]
        for i in range(40):
            response, instance = chat(messages, f"probe-{i}")
            probes.append(dict(instance=instance, tokens=response["choices"][0]["xlora"]["token_ids"],
                               cached=response["usage"]["prompt_tokens_details"]["cached_tokens"]))
            if len({p["instance"] for p in probes}) == 2:
                break
    # streaming through the proxy
    with client.stream("POST", "/v1/chat/completions", json=dict(
            messages=turns[sessions[1]][0]["messages"], max_tokens=8, temperature=0, stream=True)) as r:
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    streamed = dict(status=r.status_code, done=events[-1] == "[DONE]",
                    text="".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]))
    whole, _ = chat(turns[sessions[1]][0]["messages"], "stream-reference")
    streamed["expected"] = whole["choices"][0]["message"]["content"]
    print(json.dumps(dict(started_s=round(started, 1), cpus=cpus, turns=turns, errors=errors, probes=probes,
                          stream=streamed, total_s=round(time.monotonic() - t0, 1))))
    client.close()
    serve.shutdown()


if __name__ == "__main__":
    main()
