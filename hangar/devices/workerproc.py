"""The device worker's own side: ``python -m hangar.devices.workerproc``.

It reads ``{"target": "module:function", "kwargs": {...}}`` on stdin, calls the target and
writes ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {...}}`` on stdout. It
imports nothing but the standard library and :mod:`hangar.errors` before the target, so a
sysfs write costs an interpreter start, not hangar's imports (``hangar.devices`` exports
lazily for the same reason). The parent side is :mod:`hangar.devices.worker`.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

from hangar.errors import DeviceError, HangarError


def resolve_target(target: str) -> Callable[..., Any]:
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise DeviceError(f"worker target {target!r} is not module:function", target=target)
    function = getattr(importlib.import_module(module_name), function_name, None)
    if not callable(function):
        raise DeviceError(f"worker target {target!r} is not a function", target=target)
    return function  # type: ignore[no-any-return]


def main() -> int:
    try:
        request = json.loads(sys.stdin.buffer.read())
        result = resolve_target(str(request["target"]))(**request.get("kwargs", {}))
        answer: dict[str, Any] = {"ok": True, "result": result}
    except HangarError as error:
        answer = {
            "ok": False,
            "error": {"code": error.code, "message": error.message, "fields": error.fields},
        }
    except Exception as error:  # reported to the parent, which raises DeviceError
        answer = {"ok": False, "error": {"message": f"{type(error).__name__}: {error}"}}
    sys.stdout.write(json.dumps(answer, default=str))
    sys.stdout.flush()
    return 0 if answer["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
