"""Without engines: the frontend's admission queue, and the chat prompt it routes by (the
request's tools and template arguments reach the chat template, as in vLLM)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dynamo_ext.errors import ApiError
from dynamo_ext.frontend.app import Admission, Frontend
from dynamo_ext.frontend.config import FrontendConfig


def test_admission_queues_then_refuses_then_times_out() -> None:
    async def main() -> None:
        a = Admission(limit=1, queue=1, timeout_s=0.3)
        await a.acquire()  # in flight
        queued = asyncio.ensure_future(a.acquire())
        await asyncio.sleep(0.01)
        assert a.waiting == 1
        with pytest.raises(ApiError) as full:
            await a.acquire()
        assert full.value.status == 429 and full.value.code == "queue_full"
        assert full.value.headers == {"Retry-After": "1"}
        a.release()
        await queued  # the queued one got the slot
        assert a.active == 1 and a.waiting == 0
        with pytest.raises(ApiError) as slow:
            await a.acquire()
        assert slow.value.status == 503 and slow.value.code == "queue_timeout"
        a.release()
        await a.acquire(budget_s=0.1)

    asyncio.run(main())


def test_chat_ids_render_tools_and_template_kwargs(tiny_model: Path) -> None:
    fe = Frontend(FrontendConfig(model=str(tiny_model)))
    fe.tokenizer.chat_template = (
        "{% for t in tools or [] %}tool {{ t.function.name }} {% endfor %}"
        "{% if flavour is defined %}{{ flavour }} {% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }} {% endfor %}"
    )
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
        "chat_template_kwargs": {"flavour": "terse"},
    }
    ids = fe.chat_prompt_ids(body)
    assert fe.tokenizer.decode(ids) == "tool weather terse user: hello there "
    with pytest.raises(ApiError, match="image_url"):
        fe.chat_prompt_ids({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
