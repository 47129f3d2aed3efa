"""A short locust scenario against `ringgate demo` (routes /demo and /echo on the proxy port).

    ringgate demo            # in another terminal; proxy on 127.0.0.1:8000
    locust -f loadtest/locustfile.py --headless -u 20 -r 10 -t 15s --host http://127.0.0.1:8000

Every response is checked, not only counted: /demo must answer 200, /echo must send back the
token this request carried, and a path no route matches must get Kong's 404 message.
"""
from __future__ import annotations

import uuid

from locust import HttpUser, between, task

NO_ROUTE_MESSAGE = "no Route matched with those values"


class DemoVisitor(HttpUser):
    """One client browsing the demo: mostly /demo, some echoes, the odd unknown path."""

    wait_time = between(0.05, 0.25)

    @task(5)
    def demo_page(self) -> None:
        with self.client.get("/demo", name="GET /demo", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
            elif not response.content:
                response.failure("empty body")

    @task(3)
    def echo_get(self) -> None:
        token = uuid.uuid4().hex
        with self.client.get(f"/echo?token={token}", name="GET /echo?token", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
            elif token not in response.text:
                response.failure("the echo did not contain the request's token")

    @task(2)
    def echo_post(self) -> None:
        token = uuid.uuid4().hex
        with self.client.post("/echo", json={"token": token}, name="POST /echo", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
            elif token not in response.text:
                response.failure("the echo did not contain the posted token")

    @task(1)
    def unknown_path(self) -> None:
        with self.client.get("/no-such-route", name="GET /no-such-route", catch_response=True) as response:
            if response.status_code == 404 and NO_ROUTE_MESSAGE in response.text:
                response.success()  # locust would count any 404 as a failure otherwise
            else:
                response.failure(f"expected Kong's 404 '{NO_ROUTE_MESSAGE}', got {response.status_code}")
