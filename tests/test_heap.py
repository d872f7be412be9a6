"""The long-running commands set aside what start-up built, so full collections stay short."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from postdesk.cli import server
from postdesk.runtime import Runtime, settle_heap


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
def test_garbage_is_collected_first_and_what_lives_is_frozen() -> None:
    garbage = weakref.ref(Node())
    survivor = Node()
    settle_heap()
    assert garbage() is None, "the garbage of start-up was frozen instead of freed"
    assert gc.get_freeze_count() > 0
    assert all(obj is not survivor for obj in gc.get_objects()), "the survivor is still walked"


@pytest.mark.usefixtures("unfrozen")
def test_what_the_process_makes_afterwards_is_still_collected() -> None:
    settle_heap()
    later = weakref.ref(Node())
    gc.collect()
    assert later() is None


@pytest.mark.usefixtures("unfrozen")
def test_the_web_server_settles_the_heap_before_serving(runtime: Runtime, monkeypatch: Any) -> None:
    seen: dict[str, int] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: seen.update(frozen=gc.get_freeze_count()))
    server.run_server(runtime, host="127.0.0.1", port=0, with_worker=False)
    assert seen["frozen"] > 0
