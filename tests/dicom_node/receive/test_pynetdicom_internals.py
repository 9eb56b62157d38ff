"""Each pynetdicom internal the node relies on is checked at start-up, and its loss is named."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pynetdicom import _config as pynetdicom_config
from pynetdicom.acse import ACSE
from pynetdicom.association import Association, ServiceUser
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.presentation import PresentationContext

from dicom_node.receive.pynetdicom_internals import _problems, check_pynetdicom_internals


@pytest.fixture(autouse=True)
def fresh_check() -> Iterator[None]:
    _problems.cache_clear()
    yield
    _problems.cache_clear()


def test_the_installed_pynetdicom_has_every_internal() -> None:
    check_pynetdicom_internals()
    assert _problems() == ()


#: (class, instance attribute its constructor sets, what the error names)
INSTANCE_ATTRIBUTES = [
    (DULServiceProvider, "_run_loop_delay", "DULServiceProvider._run_loop_delay"),
    (DULServiceProvider, "socket", "DULServiceProvider.socket"),
    (DULServiceProvider, "_assoc", "DULServiceProvider.assoc"),
    (StateMachine, "current_state", "state_machine.current_state"),
    (PresentationContext, "_transfer_syntax", "PresentationContext._transfer_syntax"),
    (ServiceUser, "primitive", "ServiceUser.primitive"),
    (DIMSEServiceProvider, "msg_queue", "DIMSEServiceProvider.msg_queue"),
]


@pytest.mark.parametrize(("owner", "attribute", "named"), INSTANCE_ATTRIBUTES)
def test_a_removed_instance_attribute_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, owner: type, attribute: str, named: str
) -> None:
    constructor = owner.__init__

    def without(self: Any, *args: Any, **kwargs: Any) -> None:  # as if an upgrade renamed it
        constructor(self, *args, **kwargs)
        object.__delattr__(self, attribute)

    monkeypatch.setattr(owner, "__init__", without)
    with pytest.raises(RuntimeError, match=r"pynetdicom \S+ lacks what dicom-node relies on") as info:
        check_pynetdicom_internals()
    assert named in str(info.value)
    assert len(_problems()) == 1  # the others are still found


@pytest.mark.parametrize(("owner", "attribute", "named"), [
    (ACSE, "send_reject", "ACSE.send_reject"),
    (Association, "_serve_request", "Association._serve_request"),
    (pynetdicom_config, "LOG_HANDLER_LEVEL", "pynetdicom._config.LOG_HANDLER_LEVEL"),
    (pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", "pynetdicom._config.STORE_SEND_CHUNKED_DATASET"),
])
def test_a_removed_method_or_setting_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, owner: object, attribute: str, named: str
) -> None:
    monkeypatch.delattr(owner, attribute)
    with pytest.raises(RuntimeError, match=r"pynetdicom \S+ lacks what dicom-node relies on") as info:
        check_pynetdicom_internals()
    assert named in str(info.value)
