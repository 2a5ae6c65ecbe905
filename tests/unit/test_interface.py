"""The one description of the D-Bus API (scistreamd/interface.py): the shipped
introspection files, the daemon's dbus-next objects and scistreamctl's
client all follow it."""

from pathlib import Path

import pytest
from dbus_next.introspection import Node
from dbus_next.service import ServiceInterface, method

from scistreamd import ENDPOINT_IFACE, MANAGER_IFACE, ctl, errors, interface
from scistreamd.dbus_api import EndpointObject, ManagerObject
from scistreamd.interface import ENDPOINT, ERRORS, MANAGER, shape, signed

REPO = Path(__file__).resolve().parents[2]
XML_DIR = REPO / "etc" / "dbus-1" / "interfaces"


@pytest.mark.parametrize("name", sorted(interface.xml_files()))
def test_shipped_xml_is_generated_from_the_description(name: str) -> None:
    shipped = (XML_DIR / name).read_text()
    assert shipped == interface.xml_files()[name], (
        f"{name} is stale: run 'python3 -m scistreamd.interface etc/dbus-1/interfaces'"
    )


@pytest.mark.parametrize("obj, iface", [(ManagerObject(None), MANAGER),  # type: ignore[arg-type]
                                        (EndpointObject(None, None), ENDPOINT)])  # type: ignore
def test_daemon_objects_export_what_is_described(obj: ServiceInterface, iface) -> None:
    live = Node("/x", interfaces=[obj.introspect()]).tostring()
    described = interface.introspection_xml(iface)
    assert shape(live, iface.name) == shape(described, iface.name)
    # and the description is not empty by accident
    assert shape(described, iface.name)["methods"]


def test_description_names_and_signatures() -> None:
    assert MANAGER.name == MANAGER_IFACE and ENDPOINT.name == ENDPOINT_IFACE
    assert MANAGER.methods["InboundRequest"].in_sig == "saqua{sv}"
    assert MANAGER.methods["InboundRequest"].out_sig == "soas"
    assert MANAGER.methods["OutboundRequest"].in_sig == "sasaqua{sv}"
    assert MANAGER.methods["ListEndpoints"].out_sig == "a(sssas)"
    assert MANAGER.properties["PortRange"].sig == "(qq)"
    assert set(ERRORS) == set(errors.BY_DBUS_NAME) | {errors.ScistreamError.dbus_name()}


def test_signed_refuses_parameters_that_differ_from_the_description() -> None:
    with pytest.raises(TypeError, match="InboundRequest"):
        class Wrong(ServiceInterface):  # noqa: F841
            @method()
            @signed(MANAGER)
            async def InboundRequest(self, remote_ip, ports, num_conn, options):
                pass


def test_split_signature_and_plain_values() -> None:
    assert ctl.split_signature("sa{sv}(qq)aas") == ["s", "a{sv}", "(qq)", "aas"]
    assert ctl.split_signature("a(sssas)") == ["a(sssas)"]
    assert ctl.split_signature("") == []
    # jeepney's variants are (signature, value); structs are tuples
    props = {"PortRange": ("(qq)", (5100, 5200)), "Version": ("s", "0.1.0"),
             "Nested": ("v", ("as", ["a"]))}
    assert ctl.plain("a{sv}", props) == {"PortRange": [5100, 5200], "Version": "0.1.0",
                                         "Nested": ["a"]}
    rows = [("u", "inbound", "active", ["1.2.3.4:5"])]
    assert ctl.plain("a(sssas)", rows) == [["u", "inbound", "active", ["1.2.3.4:5"]]]
    assert ctl.plain("ay", b"ab") == "ab"


def test_exit_code_table_lives_once() -> None:
    """Every daemon error's exit code in the table is its class's; the docstring and
    --help render the same table."""
    table = {code: meaning for code, meaning, _ in ctl.EXIT_CODES}
    for cls in errors.BY_DBUS_NAME.values():
        assert cls.name in table[cls.exit_code]
    assert ctl.exit_codes_rst() in ctl.__doc__
    for code, _, short in ctl.EXIT_CODES:
        assert f"{code:<2} {short}" in ctl.EXIT_CODES_HELP


def test_man_page_documents_the_same_exit_codes() -> None:
    """scistreamctl(1) explains each code at length; it names the same codes."""
    import re

    man = (REPO / "docs" / "man" / "scistreamctl.1").read_text()
    section = man.split(".SH EXIT STATUS", 1)[1].split(".SH ", 1)[0]
    documented = [int(c) for c in re.findall(r"^\.B (\d+)$", section, re.M)]
    assert documented == [code for code, _, _ in ctl.EXIT_CODES]
