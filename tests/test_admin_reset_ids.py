"""POST /admin/routes/{route}/targets/{target}/reset with `/` in route names and target ids."""

from __future__ import annotations

from urllib.parse import quote

import aiohttp
import pytest

from edgeroute.mock_provider import MockSettings
from tests.support.gateway import gateway_config, mock_upstreams, running_gateway

ADMIN = {"Authorization": "Bearer admin-token-1"}


@pytest.mark.parametrize("encode", [False, True], ids=["plain", "percent-encoded"])
async def test_reset_targets_whose_ids_contain_slashes(encode: bool) -> None:
    route, target = "org/chat", "vllm:meta-llama/Llama-3.1-8B-Instruct"
    async with mock_upstreams(vllm=MockSettings(error_rate=1.0)) as mocks:
        document = gateway_config(
            mocks,
            [
                {
                    "model": route,
                    "targets": [{"provider": "vllm", "model": "meta-llama/Llama-3.1-8B-Instruct"}],
                }
            ],
            server={"admin_token": "admin-token-1"},
            breaker={"failure_threshold": 1, "open_timeout_s": 300},
        )
        async with running_gateway(document) as (url, _), aiohttp.ClientSession() as http:
            body = {"model": route, "messages": [{"role": "user", "content": "hi"}]}
            chat = f"{url}/v1/chat/completions"
            async with http.post(chat, json=body) as response:
                assert response.status == 502  # the one failure opens the breaker
            async with http.post(chat, json=body) as response:
                assert response.status == 503  # open: the upstream is not even tried
            assert await mocks["vllm"].requests() == 1

            path_route = quote(route, safe="") if encode else route
            path_target = quote(target, safe="") if encode else target
            reset = f"{url}/admin/routes/{path_route}/targets/{path_target}/reset"
            async with http.post(reset, headers=ADMIN) as response:
                assert response.status == 200, await response.text()
            async with http.post(chat, json=body) as response:
                assert response.status == 502  # closed again: tried (and failing) again
            assert await mocks["vllm"].requests() == 2

            unknown = f"{url}/admin/routes/{route}/targets/vllm:meta-llama/other/reset"
            async with http.post(unknown, headers=ADMIN) as response:
                assert response.status == 404
                assert (await response.json())["error"]["code"] == "target_not_found"
