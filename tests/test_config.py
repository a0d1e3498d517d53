"""The config file: every malformed file a user writes, and the exact message for it."""

from __future__ import annotations

import contextlib
import grp
import os
import random
import re
import shutil
import ssl
from importlib import resources
from pathlib import Path

import pytest

from reconnectd import config as config_module
from reconnectd.cli import main
from reconnectd.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    MoonrakerConfig,
    OctoPrintConfig,
    PrinterConfig,
    config_path,
    exposure,
    load_config,
    missing_keys,
    parse_config,
)
from tests.support.tls import Pki, make_pki

SOURCE = Path("/etc/reconnectd/reconnectd.toml")
SECRET = "S3CRETKEY0123456789abcdefABCDEF01"
PRINTER = '[[printer]]\nname = "mk3s"\n'
PRINTER_PORT = '[[printer]]\nname = "mk3s"\nport = "/dev/ttyACM0"\n'
URL_FORM = 'expected an http:// or https:// URL with a host like "http://127.0.0.1:5000"'
BAUDRATE_FORM = (
    "must be a serial speed between 300 and 4000000 bits per second like 115200 or 250000"
)
SERIAL_FORM = (
    "udev reports a USB serial number with white space and every character but letters,"
    ' digits and "#+-.:=@_" replaced by "_" (as reconnectd devices prints it)'
)
USB_PATH = "pci-0000:00:14.0-usb-0:1.2:1.0"
USB_PATH_FORM = (
    f'expected a USB path without spaces as "reconnectd devices" prints it, like "{USB_PATH}"'
)
PRINTER_CH340 = PRINTER + 'vendor_id = "1a86"\nproduct_id = "7523"\n'
CREDENTIAL_FORM = (
    'expected the name of a systemd credential like "octoprint.key"'
    " (LoadCredential=octoprint.key:/etc/reconnectd/octoprint.key)"
)
NOT_PEM = '"{file}" holds no PEM certificate ("-----BEGIN CERTIFICATE-----" block)'
CA_FILE_FORM = 'expected the path of a PEM file of CA certificates like "/etc/reconnectd/ca.pem"'


def problems_of(text: str, source: Path = SOURCE) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source)
    return info.value.problems


# --- one mistake, one exact message ------------------------------------------------

MALFORMED = [
    pytest.param(
        PRINTER + 'vendorid = "2c99"\n',
        ['printer[0].vendorid: unknown key "vendorid" (did you mean "vendor_id"?)'],
        id="unknown-key-suggested",
    ),
    pytest.param(
        'frobnicate = 1\n[octoprint]\nurl = "http://octopi.local"\n',
        ['frobnicate: unknown key "frobnicate" (expected one of: octoprint, moonraker, printer)'],
        id="unknown-top-level-key",
    ),
    pytest.param(
        '[octoprnt]\nurl = "http://octopi.local"\n',
        ['octoprnt: unknown key "octoprnt" (did you mean "octoprint"?)'],
        id="unknown-table-suggested",
    ),
    pytest.param(
        PRINTER_PORT + '[printer.octoprint]\nurll = "http://x"\n',
        ['printer[0].octoprint.urll: unknown key "urll" (did you mean "url"?)'],
        id="unknown-key-in-printer-octoprint",
    ),
    pytest.param(
        PRINTER_PORT + '"odd key" = 1\n',
        [
            'printer[0]."odd key": unknown key "odd key" (expected one of: name, vendor_id,'
            " product_id, serial, usb_path, port, baudrate, profile, settle, poll, octoprint,"
            " moonraker, stuck_after, retry_first, retry_max)"
        ],
        id="unknown-quoted-key",
    ),
    pytest.param(
        PRINTER_PORT + 'settle = "1s"\n',
        ['printer[0].settle: expected a number of seconds, got "1s"'],
        id="duration-as-string",
    ),
    pytest.param(
        PRINTER_PORT + "settle = 1979-05-27\n",
        ["printer[0].settle: expected a number of seconds, got a date"],
        id="duration-as-date",
    ),
    pytest.param(
        PRINTER_PORT + "baudrate = true\n",
        ["printer[0].baudrate: expected an integer, got true"],
        id="baudrate-bool",
    ),
    pytest.param(
        PRINTER_PORT + "baudrate = 115200.0\n",
        ["printer[0].baudrate: expected an integer, got 115200.0"],
        id="baudrate-float",
    ),
    pytest.param(
        PRINTER_PORT + "baudrate = 0\n",
        [f"printer[0].baudrate: {BAUDRATE_FORM}, got 0"],
        id="baudrate-zero",
    ),
    pytest.param(
        PRINTER_PORT + "baudrate = 7\n",
        [f"printer[0].baudrate: {BAUDRATE_FORM}, got 7"],
        id="baudrate-absurdly-low",
    ),
    pytest.param(
        PRINTER_PORT + "baudrate = 10_000_000\n",
        [f"printer[0].baudrate: {BAUDRATE_FORM}, got 10000000"],
        id="baudrate-absurdly-high",
    ),
    pytest.param(
        PRINTER + 'vendor_id = "2c99"\nserial = "CZPX 1017"\n',
        [f'printer[0].serial: {SERIAL_FORM}: write "CZPX_1017", got "CZPX 1017"'],
        id="serial-with-a-space",
    ),
    pytest.param(
        PRINTER + 'vendor_id = "2c99"\nserial = "  A1\\tB2   C3 "\n',
        [f'printer[0].serial: {SERIAL_FORM}: write "A1_B2_C3", got "  A1\\tB2   C3 "'],
        id="serial-with-runs-of-white-space",
    ),
    pytest.param(
        PRINTER + 'vendor_id = "2c99"\nserial = "AB,CD/1(2)"\n',
        [f'printer[0].serial: {SERIAL_FORM}: write "AB_CD_1_2_", got "AB,CD/1(2)"'],
        id="serial-with-characters-udev-replaces",
    ),
    pytest.param(
        PRINTER + 'vendor_id = "2c9"\n',
        ['printer[0].vendor_id: expected 4 hex digits like "2c99", got "2c9"'],
        id="bad-hex-short",
    ),
    pytest.param(
        PRINTER + 'vendor_id = "2c99"\nproduct_id = "00g2"\n',
        ['printer[0].product_id: expected 4 hex digits like "2c99", got "00g2"'],
        id="bad-hex-letter",
    ),
    pytest.param(
        PRINTER + "vendor_id = 0x2c99\n",
        ['printer[0].vendor_id: expected 4 hex digits in quotes like "2c99", got 11417'],
        id="hex-as-number",
    ),
    pytest.param(
        PRINTER_PORT + PRINTER_PORT,
        ['printer[1].name: "mk3s" is also the name of printer[0]'],
        id="duplicate-name",
    ),
    pytest.param(
        '[[printer]]\nport = "/dev/ttyACM0"\n',
        ['printer[0].name: missing: every [[printer]] needs a unique name like "mk3s"'],
        id="missing-name",
    ),
    pytest.param(
        '[[printer]]\nname = "my printer"\nport = "/dev/ttyACM0"\n',
        [
            'printer[0].name: expected a name of letters, digits, "_", "." and "-" like "mk3s",'
            ' got "my printer"'
        ],
        id="name-with-space",
    ),
    pytest.param(
        '[[printer]]\nname = ".."\nport = "/dev/ttyACM0"\n',
        [
            'printer[0].name: expected a name of letters, digits, "_", "." and "-" like "mk3s",'
            ' got ".."'
        ],
        id="name-dots-only",
    ),
    pytest.param(
        PRINTER_PORT + "settle = -1\n",
        ["printer[0].settle: must be at least 0 and at most 600 seconds, got -1"],
        id="negative-settle",
    ),
    pytest.param(
        PRINTER_PORT + "settle = 600.5\n",
        ["printer[0].settle: must be at least 0 and at most 600 seconds, got 600.5"],
        id="settle-too-long",
    ),
    pytest.param(
        PRINTER_PORT + "poll = 3\n",
        ["printer[0].poll: must be 0 (off) or between 5 and 86400 seconds, got 3"],
        id="poll-too-short",
    ),
    pytest.param(
        PRINTER_PORT + "poll = -5\n",
        ["printer[0].poll: must be 0 (off) or between 5 and 86400 seconds, got -5"],
        id="poll-negative",
    ),
    pytest.param(
        PRINTER_PORT + "poll = inf\n",
        ["printer[0].poll: must be 0 (off) or between 5 and 86400 seconds, got inf"],
        id="poll-infinite",
    ),
    pytest.param(
        "[octoprint]\ntimeout = 0\n",
        ["octoprint.timeout: must be more than 0 and at most 60 seconds, got 0"],
        id="timeout-zero",
    ),
    pytest.param(
        "[octoprint]\ntimeout = 61\n",
        ["octoprint.timeout: must be more than 0 and at most 60 seconds, got 61"],
        id="timeout-too-long",
    ),
    pytest.param(
        "[octoprint]\ntimeout = nan\n",
        ["octoprint.timeout: must be more than 0 and at most 60 seconds, got nan"],
        id="timeout-nan",
    ),
    pytest.param(
        "[octoprint\n",
        ["line 1, column 11: Expected ']' at the end of a table declaration"],
        id="toml-syntax-error",
    ),
    pytest.param(
        '[octoprint]\nurl = "http://octopi.local\n',
        ["line 2, column 27: Illegal character '\\n'"],
        id="toml-unclosed-string",
    ),
    pytest.param(
        '[octoprint]\nurl = "http://a"\nurl = "http://b"\n',
        ["line 3, column 17: Cannot overwrite a value"],
        id="toml-duplicate-key",
    ),
    pytest.param(
        f'[octoprint]\napi_key = "{SECRET}"\napi_key_file = "octoprint.key"\n',
        ["octoprint: api_key and api_key_file are both set; keep one"],
        id="both-api-key-and-file",
    ),
    pytest.param(
        f'[octoprint]\napi_key = "{SECRET}"\napi_key_credential = "octoprint.key"\n',
        ["octoprint: api_key and api_key_credential are both set; keep one"],
        id="both-api-key-and-credential",
    ),
    pytest.param(
        PRINTER_PORT
        + '[printer.octoprint]\napi_key_file = "k"\napi_key_credential = "octoprint.key"\n',
        ["printer[0].octoprint: api_key_file and api_key_credential are both set; keep one"],
        id="both-file-and-credential",
    ),
    pytest.param(
        f'[octoprint]\napi_key = "{SECRET}"\napi_key_file = "k"\napi_key_credential = "k"\n',
        ["octoprint: api_key, api_key_file and api_key_credential are all set; keep one"],
        id="all-three-key-sources",
    ),
    pytest.param(
        "[octoprint]\napi_key_credential = 1\n",
        [f"octoprint.api_key_credential: {CREDENTIAL_FORM}, got 1"],
        id="credential-number",
    ),
    pytest.param(
        '[octoprint]\napi_key_credential = ""\n',
        [f'octoprint.api_key_credential: {CREDENTIAL_FORM}, got ""'],
        id="credential-empty",
    ),
    pytest.param(
        '[octoprint]\napi_key_credential = ".."\n',
        [f'octoprint.api_key_credential: {CREDENTIAL_FORM}, got ".."'],
        id="credential-dot-dot",
    ),
    pytest.param(
        '[octoprint]\napi_key_credential = "octoprint:key"\n',
        [f'octoprint.api_key_credential: {CREDENTIAL_FORM}, got "octoprint:key"'],
        id="credential-with-colon",
    ),
    pytest.param(
        '[octoprint]\napi_key_credential = "octo print"\n',
        [f'octoprint.api_key_credential: {CREDENTIAL_FORM}, got "octo print"'],
        id="credential-with-space",
    ),
    pytest.param(
        '[octoprint]\napi_key_credential = "/etc/reconnectd/octoprint.key"\n',
        [
            "octoprint.api_key_credential: expected the name of a credential, not a path:"
            " LoadCredential=NAME:PATH makes PATH the credential NAME,"
            ' got "/etc/reconnectd/octoprint.key"'
        ],
        id="credential-as-path",
    ),
    pytest.param(
        '[octoprint]\nca_file = ""\n',
        [f'octoprint.ca_file: {CA_FILE_FORM}, got ""'],
        id="ca-file-empty",
    ),
    pytest.param(
        PRINTER_PORT + "[printer.octoprint]\nca_file = true\n",
        [f"printer[0].octoprint.ca_file: {CA_FILE_FORM}, got true"],
        id="ca-file-bool",
    ),
    pytest.param(
        "[octoprint]\nca_file = ['/etc/ssl/ca.pem']\n",
        [f"octoprint.ca_file: {CA_FILE_FORM}, got an array"],
        id="ca-file-array",
    ),
    pytest.param(
        '[octoprint]\nca-file = "/etc/reconnectd/ca.pem"\n',
        ['octoprint.ca-file: unknown key "ca-file" (did you mean "ca_file"?)'],
        id="ca-file-misspelt",
    ),
    pytest.param(
        '[octoprint]\napi_key = ""\n',
        ["octoprint.api_key: must not be empty"],
        id="empty-api-key",
    ),
    pytest.param(
        "[octoprint]\napi_key = 1234567\n",
        ["octoprint.api_key: expected the key as a string, got a number"],
        id="api-key-number",
    ),
    pytest.param(
        f'[octoprint]\napi_key = "{SECRET} {SECRET}"\n',
        ["octoprint.api_key: the key must be a single word with no spaces or line breaks"],
        id="api-key-two-words",
    ),
    pytest.param(
        '[octoprint]\nurl = "ftp://octopi.local"\n',
        [f'octoprint.url: {URL_FORM}, got "ftp://octopi.local"'],
        id="url-not-http",
    ),
    pytest.param(
        '[octoprint]\nurl = "http://"\n',
        [f'octoprint.url: {URL_FORM}, got "http://"'],
        id="url-without-host",
    ),
    pytest.param(
        '[octoprint]\nurl = "octopi.local:5000"\n',
        [f'octoprint.url: {URL_FORM}, got "octopi.local:5000"'],
        id="url-without-scheme",
    ),
    pytest.param(
        '[octoprint]\nurl = "http://octopi.local:99999"\n',
        [f'octoprint.url: {URL_FORM}, got "http://octopi.local:99999"'],
        id="url-bad-port",
    ),
    pytest.param(
        '[octoprint]\nurl = "gopher://admin:hunter2@octopi.local/"\n',
        [f'octoprint.url: {URL_FORM}, got "gopher://admin:***@octopi.local/"'],
        id="url-password-redacted",
    ),
    pytest.param(
        "[octoprint]\nurl = 5000\n",
        [f"octoprint.url: {URL_FORM}, got 5000"],
        id="url-number",
    ),
    pytest.param(
        '[[printer]]\nname = "mk3s"\nbaudrate = 115200\n',
        ["printer[0]: needs vendor_id or port to know which device is this printer"],
        id="neither-vendor-nor-port",
    ),
    pytest.param(
        PRINTER_PORT + 'product_id = "0002"\n',
        ["printer[0].product_id: needs vendor_id as well"],
        id="product-without-vendor",
    ),
    pytest.param(
        PRINTER_PORT + 'serial = "CZPX1017"\n',
        ["printer[0].serial: needs vendor_id as well"],
        id="serial-without-vendor",
    ),
    pytest.param(
        PRINTER_PORT + "serial = 1017\n",
        [
            "printer[0].serial: expected a non-empty string, got 1017",
            "printer[0].serial: needs vendor_id as well",
        ],
        id="serial-number-and-no-vendor",
    ),
    pytest.param(
        PRINTER_CH340 + f'usbpath = "{USB_PATH}"\n',
        ['printer[0].usbpath: unknown key "usbpath" (did you mean "usb_path"?)'],
        id="unknown-usb-path-suggested",
    ),
    pytest.param(
        PRINTER_PORT + f'usb_path = "{USB_PATH}"\n',
        ["printer[0].usb_path: needs vendor_id as well"],
        id="usb-path-without-vendor",
    ),
    pytest.param(
        '[[printer]]\nname = "mk3s"\n' + f'usb_path = "{USB_PATH}"\n',
        [
            "printer[0]: needs vendor_id or port to know which device is this printer",
            "printer[0].usb_path: needs vendor_id as well",
        ],
        id="usb-path-alone",
    ),
    pytest.param(
        PRINTER_PORT + "usb_path = 12\n",
        [
            f"printer[0].usb_path: {USB_PATH_FORM}, got 12",
            "printer[0].usb_path: needs vendor_id as well",
        ],
        id="usb-path-number-and-no-vendor",
    ),
    pytest.param(
        PRINTER_CH340 + 'usb_path = ""\n',
        [f'printer[0].usb_path: {USB_PATH_FORM}, got ""'],
        id="usb-path-empty",
    ),
    pytest.param(
        PRINTER_CH340 + 'usb_path = "   "\n',
        [f'printer[0].usb_path: {USB_PATH_FORM}, got "   "'],
        id="usb-path-blank",
    ),
    pytest.param(
        PRINTER_CH340 + 'usb_path = "pci-0000:00:14.0-usb-0:1.2:1.0 "\n',
        [f'printer[0].usb_path: {USB_PATH_FORM}, got "pci-0000:00:14.0-usb-0:1.2:1.0 "'],
        id="usb-path-trailing-space",
    ),
    pytest.param(
        PRINTER_CH340 + 'usb_path = "pci-0000:00:14.0\tusb-0:1.2:1.0"\n',
        [f'printer[0].usb_path: {USB_PATH_FORM}, got "pci-0000:00:14.0\\tusb-0:1.2:1.0"'],
        id="usb-path-tab",
    ),
    pytest.param(
        PRINTER_CH340 + 'usb_path = "usb-0:1.2\\n:1.0"\n',
        [f'printer[0].usb_path: {USB_PATH_FORM}, got "usb-0:1.2\\n:1.0"'],
        id="usb-path-line-break",
    ),
    pytest.param(
        PRINTER_CH340 + 'usb_path = "usb-0:1.2\\u0000"\n',
        [f'printer[0].usb_path: {USB_PATH_FORM}, got "usb-0:1.2\\u0000"'],
        id="usb-path-nul",
    ),
    pytest.param(
        PRINTER_CH340 + "usb_path = true\n",
        [f"printer[0].usb_path: {USB_PATH_FORM}, got true"],
        id="usb-path-bool",
    ),
    pytest.param(
        PRINTER_CH340 + f'usb_path = ["{USB_PATH}"]\n',
        [f"printer[0].usb_path: {USB_PATH_FORM}, got an array"],
        id="usb-path-array",
    ),
    pytest.param(
        PRINTER_PORT + 'profile = ""\n',
        ['printer[0].profile: expected a non-empty string, got ""'],
        id="empty-profile",
    ),
    pytest.param(
        '[[printer]]\nname = "mk3s"\nport = "ttyACM0"\n',
        [
            'printer[0].port: expected an absolute path under /dev like "/dev/ttyACM0",'
            ' got "ttyACM0"'
        ],
        id="port-relative",
    ),
    pytest.param(
        '[[printer]]\nname = "mk3s"\nport = "/dev/../etc/passwd"\n',
        [
            'printer[0].port: expected an absolute path under /dev like "/dev/ttyACM0",'
            ' got "/dev/../etc/passwd"'
        ],
        id="port-escapes-dev",
    ),
    pytest.param(
        "printer = 5\n",
        ["printer: expected an array of tables [[printer]], got 5"],
        id="printer-not-array",
    ),
    pytest.param(
        '[printer]\nname = "mk3s"\n',
        ["printer: expected an array of tables written [[printer]], got a table [printer]"],
        id="printer-single-brackets",
    ),
    pytest.param(
        'printer = [1, "a"]\n',
        [
            "printer[0]: expected a table [[printer]], got 1",
            'printer[1]: expected a table [[printer]], got "a"',
        ],
        id="printer-array-of-values",
    ),
    pytest.param(
        PRINTER_PORT + 'octoprint = "http://127.0.0.1:5001"\n',
        ['printer[0].octoprint: expected a table [printer.octoprint], got "http://127.0.0.1:5001"'],
        id="printer-octoprint-not-table",
    ),
    pytest.param(
        "octoprint = 5\n",
        ["octoprint: expected a table [octoprint], got 5"],
        id="octoprint-not-table",
    ),
]


@pytest.mark.parametrize(("text", "expected"), MALFORMED)
def test_malformed_file_names_file_key_and_problem(text: str, expected: list[str]) -> None:
    assert problems_of(text) == [f"{SOURCE}: {line}" for line in expected]


def test_toml_error_at_end_of_file_says_so() -> None:
    assert problems_of('[octoprint]\nurl = "http://x') == [
        f"{SOURCE}: end of file: Unterminated string"
    ]


def test_several_problems_are_all_reported_in_one_error() -> None:
    text = (
        '[octoprint]\nurl = "ftp://x"\ntimeout = -1\n'
        '[[printer]]\nname = "a"\nvendor_id = "2c9"\nsettle = "1s"\n'
        '[[printer]]\nname = "a"\nport = "/dev/ttyUSB0"\npol = 10\n'
    )
    expected = [
        f'octoprint.url: {URL_FORM}, got "ftp://x"',
        "octoprint.timeout: must be more than 0 and at most 60 seconds, got -1",
        'printer[0].vendor_id: expected 4 hex digits like "2c99", got "2c9"',
        'printer[0].settle: expected a number of seconds, got "1s"',
        'printer[1].pol: unknown key "pol" (did you mean "poll"?)',
        'printer[1].name: "a" is also the name of printer[0]',
    ]
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE)
    assert info.value.problems == [f"{SOURCE}: {line}" for line in expected]
    assert str(info.value) == "\n".join(f"{SOURCE}: {line}" for line in expected)


# --- a user name and password in the URL (basic auth in front of OctoPrint) ---------

PASSWORD = "Sekr1t-pw"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        pytest.param(
            f"http://:{PASSWORD}@octopi.local",
            'the user name before ":" is empty; HTTP basic auth needs one,'
            ' got "http://:***@octopi.local"',
            id="empty-user-name",
        ),
        pytest.param(
            f"http://{PASSWORD}@octopi.local",
            'a user name without a password before "@": requests then sends no credentials'
            ' at all; write "user:password@" ("user:@" for an empty password),'
            ' got "http://***@octopi.local"',
            id="token-without-password",
        ),
        pytest.param(
            f"http://user:{PASSWORD}%zz@octopi.local",
            'the password has an invalid percent-escape: "%" must be followed by two hex'
            ' digits (a "%" itself is written %25), got "http://user:***@octopi.local"',
            id="invalid-percent-escape",
        ),
        pytest.param(
            f"http://user:{PASSWORD}%4@octopi.local",
            'the password has an invalid percent-escape: "%" must be followed by two hex'
            ' digits (a "%" itself is written %25), got "http://user:***@octopi.local"',
            id="percent-escape-cut-short",
        ),
        pytest.param(
            f"http://user:{PASSWORD} x@octopi.local",
            "the password has a character a URL cannot hold as it is (a space, a control"
            ' character or one of "/?#@[]<>\\^`{|}): percent-encode it, as %2F for "/"'
            ' or %40 for "@", got "http://user:***@octopi.local"',
            id="space-in-password",
        ),
        pytest.param(
            f"http://user:{PASSWORD}\\u0007@octopi.local",
            "the password has a character a URL cannot hold as it is (a space, a control"
            ' character or one of "/?#@[]<>\\^`{|}): percent-encode it, as %2F for "/"'
            ' or %40 for "@", got "http://user:***@octopi.local"',
            id="control-character-in-password",
        ),
        pytest.param(
            f"http://user:{PASSWORD}/x@octopi.local",
            "the password has a character a URL cannot hold as it is (a space, a control"
            ' character or one of "/?#@[]<>\\^`{|}): percent-encode it, as %2F for "/"'
            ' or %40 for "@", got "http://user:***@octopi.local"',
            id="slash-in-password",
        ),
        pytest.param(
            f"http://user:{PASSWORD}@x@octopi.local",
            "the password has a character a URL cannot hold as it is (a space, a control"
            ' character or one of "/?#@[]<>\\^`{|}): percent-encode it, as %2F for "/"'
            ' or %40 for "@", got "http://user:***@octopi.local"',
            id="at-sign-in-password",
        ),
        pytest.param(
            f"http://my user:{PASSWORD}@octopi.local",
            "the user name has characters a URL cannot hold as they are (' '): write %20"
            " for ' ', got \"http://my user:***@octopi.local\"",
            id="space-in-user-name",
        ),
        pytest.param(
            f"http://us%3Aer:{PASSWORD}@octopi.local",
            'the user name holds ":" (%3A), which HTTP basic auth cannot carry in a user'
            ' name, got "http://us%3Aer:***@octopi.local"',
            id="colon-in-user-name-after-decoding",
        ),
        pytest.param(
            f"http://user:{PASSWORD}%0A@octopi.local",
            "the password holds a control character, which HTTP basic auth cannot carry,"
            ' got "http://user:***@octopi.local"',
            id="control-character-after-decoding",
        ),
        pytest.param(
            f"http://user:{PASSWORD}%E2%82%AC@octopi.local",
            "the password holds a character outside Latin-1, which requests cannot send in"
            ' HTTP basic auth, got "http://user:***@octopi.local"',
            id="euro-sign-not-latin-1",
        ),
        pytest.param(
            f"http://user:{PASSWORD}€@octopi.local",
            "the password holds a character outside Latin-1, which requests cannot send in"
            ' HTTP basic auth, got "http://user:***@octopi.local"',
            id="euro-sign-unencoded",
        ),
        pytest.param(
            f"http://user:{PASSWORD}%E4@octopi.local",
            "the password's percent-escapes are not UTF-8: write each character as the"
            ' escapes of its UTF-8 bytes ("ä" is %C3%A4), got "http://user:***@octopi.local"',
            id="latin-1-byte-escaped-is-not-utf-8",
        ),
    ],
)
def test_url_credentials_basic_auth_cannot_carry_are_refused_without_the_password(
    url: str, problem: str
) -> None:
    problems = problems_of(f'[octoprint]\nurl = "{url}"\n')
    assert problems == [f"{SOURCE}: octoprint.url: {problem}"]
    assert PASSWORD not in problems[0]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:secret@octopi.local:5000", "http://user:***@octopi.local:5000"),
        ("http://user:@octopi.local", "http://user:***@octopi.local"),  # an empty password
        ("https://user:p%40ss%2Fw%C3%A4rd@octopi.local/", "https://user:***@octopi.local"),
        ("http://j%C3%BCrgen:pässwort@octopi.local", "http://j%C3%BCrgen:***@octopi.local"),
        (
            "http://a-b.c_d~e!$&'()*+,;=:x@octopi.local",
            "http://a-b.c_d~e!$&'()*+,;=:***@octopi.local",
        ),
    ],
)
def test_url_credentials_basic_auth_can_carry_are_kept_as_written(url: str, shown: str) -> None:
    config = parse_config(f'[octoprint]\nurl = "{url}"\n', SOURCE)
    assert config.octoprint.url == url.rstrip("/")
    assert config.octoprint.shown_url == shown
    assert config.printers[0].octoprint.shown_url == shown


def test_config_file_with_a_url_password_others_can_read_is_warned(tmp_path: Path) -> None:
    path = write(
        tmp_path / "reconnectd.toml",
        f'[octoprint]\nurl = "http://user:{PASSWORD}@octopi.local"\napi_key_file = "k"\n',
    )
    secret_file(tmp_path / "k", 0o600)
    path.chmod(0o644)
    assert load_config(str(path), {}).warnings == (
        f"{path}: holds a password in a url and is readable by other users; run: chmod 600 {path}",
    )
    path.chmod(0o600)
    assert load_config(str(path), {}).warnings == ()


# --- one OctoPrint instance drives one printer -----------------------------------------

SAME_INSTANCE = (
    ": one OctoPrint instance drives one printer connection; give each printer its own"
    " [printer.octoprint] url"
)


def test_two_printers_of_the_shared_octoprint_are_refused() -> None:
    text = PRINTER_PORT + '[[printer]]\nname = "mini"\nport = "/dev/ttyACM1"\n'
    assert problems_of(text) == [
        f'{SOURCE}: printer[1].octoprint.url: printer "mk3s" and printer "mini" both use the'
        " OctoPrint at http://127.0.0.1:5000 ([octoprint]'s, as this printer has no"
        f" [printer.octoprint] url){SAME_INSTANCE}"
    ]


@pytest.mark.parametrize(
    ("first", "second", "shown"),
    [
        pytest.param(
            "http://OctoPi.Local:80/",
            "http://octopi.local",
            "http://OctoPi.Local:80 and http://octopi.local",
            id="host-case-and-default-port",
        ),
        pytest.param(
            "https://octopi.local/octoprint/",
            "https://octopi.local:443/octoprint",
            "https://octopi.local/octoprint and https://octopi.local:443/octoprint",
            id="https-default-port-and-trailing-slash",
        ),
        pytest.param(
            "http://octopi.local:5000",
            f"http://user:{PASSWORD}@octopi.local:5000",
            "http://octopi.local:5000 and http://user:***@octopi.local:5000",
            id="credentials-do-not-count",
        ),
        pytest.param(
            "http://127.0.0.1:5001",
            "http://127.0.0.1:5001",
            "http://127.0.0.1:5001",
            id="written-alike",
        ),
    ],
)
def test_two_printers_of_one_octoprint_instance_are_refused(
    first: str, second: str, shown: str
) -> None:
    text = (
        f'{PRINTER_PORT}[printer.octoprint]\nurl = "{first}"\n'
        f'[[printer]]\nname = "mini"\nport = "/dev/ttyACM1"\n'
        f'[printer.octoprint]\nurl = "{second}"\n'
    )
    problems = problems_of(text)
    assert problems == [
        f'{SOURCE}: printer[1].octoprint.url: printer "mk3s" and printer "mini" both use the'
        f" OctoPrint at {shown}{SAME_INSTANCE}"
    ]
    assert PASSWORD not in problems[0]


def test_a_printer_naming_the_shared_octoprint_again_is_refused() -> None:
    text = (
        '[octoprint]\nurl = "http://octopi.local:5000"\n'
        + PRINTER_PORT
        + '[[printer]]\nname = "mini"\nport = "/dev/ttyACM1"\n'
        + '[printer.octoprint]\nurl = "http://OCTOPI.local:5000/"\n'
    )
    assert problems_of(text) == [
        f'{SOURCE}: printer[1].octoprint.url: printer "mk3s" and printer "mini" both use the'
        f" OctoPrint at http://octopi.local:5000 and http://OCTOPI.local:5000{SAME_INSTANCE}"
    ]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("http://octopi.local:5000", "http://octopi.local:5001", id="ports"),
        pytest.param("http://proxy.lan/mk3s", "http://proxy.lan/mini", id="paths"),
        pytest.param("http://octopi.local", "https://octopi.local", id="schemes"),
        pytest.param("http://octopi.local", "http://octopi-2.local", id="hosts"),
    ],
)
def test_printers_of_different_octoprint_instances_are_accepted(first: str, second: str) -> None:
    text = (
        f'{PRINTER_PORT}[printer.octoprint]\nurl = "{first}"\n'
        f'[[printer]]\nname = "mini"\nport = "/dev/ttyACM1"\n'
        f'[printer.octoprint]\nurl = "{second}"\n'
    )
    mk3s, mini = parse_config(text, SOURCE).printers
    assert (mk3s.octoprint.url, mini.octoprint.url) == (first, second)


# --- plausible values: the bounds themselves are accepted -----------------------------


@pytest.mark.parametrize("baudrate", [300, 115200, 250000, 4_000_000])
def test_baudrates_in_the_plausible_range_are_accepted(baudrate: int) -> None:
    (printer,) = parse_config(f"{PRINTER_PORT}baudrate = {baudrate}\n", SOURCE).printers
    assert printer.baudrate == baudrate


@pytest.mark.parametrize(
    "serial",
    ["CZPX1017X004XK12345", "A#+-.:=@_z", "Prusa_Research_MK4", "Ünïcödé", "odd\\\\x20name"],
)
def test_serials_as_udev_writes_them_are_accepted(serial: str) -> None:
    text = f'{PRINTER}vendor_id = "2c99"\nserial = "{serial}"\n'
    (printer,) = parse_config(text, SOURCE).printers
    assert printer.serial == serial.replace("\\\\", "\\")


# --- a printer whose OctoPrint has no key ------------------------------------------------

HOW_TO_GET_A_KEY = (
    'run "reconnectd login" to get one from OctoPrint (it stores the key and sets'
    " api_key_file), or set api_key_file to a file holding one"
)


def test_missing_keys_names_the_table_the_url_and_the_printer() -> None:
    text = (
        '[octoprint]\nurl = "http://user:secret@octopi.local:5000"\n'
        + PRINTER_PORT
        + '[[printer]]\nname = "mini"\nport = "/dev/ttyACM1"\n'
        + '[printer.octoprint]\nurl = "http://octopi.local:5001"\n'
        + '[[printer]]\nname = "xl"\nport = "/dev/ttyACM2"\n'
        + f'[printer.octoprint]\nurl = "http://octopi.local:5002"\napi_key = "{SECRET}"\n'
    )
    config = parse_config(text, SOURCE)
    assert config_module.missing_keys(config, Path("/elsewhere.toml")) == [
        f"{SOURCE}: octoprint: no API key for the OctoPrint at"
        f' http://user:***@octopi.local:5000, which printer "mk3s" uses; {HOW_TO_GET_A_KEY}',
        f"{SOURCE}: printer[1].octoprint: no API key for the OctoPrint at"
        f' http://octopi.local:5001, which printer "mini" uses; {HOW_TO_GET_A_KEY}',
    ]


def test_missing_keys_of_zero_config_names_the_file_it_would_read() -> None:
    config = Config(source=None, octoprint=OctoPrintConfig(), printers=config_module.zero_config())
    assert config_module.missing_keys(config, DEFAULT_CONFIG_PATH) == [
        f"{DEFAULT_CONFIG_PATH}: octoprint: no API key for the OctoPrint at"
        " http://127.0.0.1:5000, which every known printer board uses (there is no"
        f" [[printer]]); {HOW_TO_GET_A_KEY}"
    ]


def test_no_missing_keys_when_every_printer_has_one() -> None:
    config = parse_config(f'[octoprint]\napi_key = "{SECRET}"\n{PRINTER_PORT}', SOURCE)
    assert config_module.missing_keys(config, SOURCE) == []


# --- the API key file -----------------------------------------------------------


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def test_api_key_file_relative_to_config_dir_is_read_and_stripped(tmp_path: Path) -> None:
    source = tmp_path / "etc" / "reconnectd.toml"
    write(tmp_path / "etc" / "keys" / "octoprint.key", f"\n  {SECRET}  \n")
    config = parse_config('[octoprint]\napi_key_file = "keys/octoprint.key"\n', source)
    assert config.octoprint.api_key == SECRET
    assert config.octoprint.api_key_file == tmp_path / "etc" / "keys" / "octoprint.key"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(None, 'cannot read "{file}": No such file or directory', id="missing"),
        pytest.param("", '"{file}" is empty', id="empty"),
        pytest.param(" \n\t\n", '"{file}" is empty', id="blank"),
        pytest.param(b"\xff\xfe", '"{file}" is not UTF-8 text', id="not-utf8"),
        pytest.param(
            f"{SECRET}\n{SECRET}\n",
            "the key must be a single word with no spaces or line breaks",
            id="two-lines",
        ),
        pytest.param("x" * 5000, '"{file}" is larger than 4096 bytes: not a key file', id="huge"),
    ],
)
def test_api_key_file_problems(tmp_path: Path, content: str | bytes | None, problem: str) -> None:
    source = tmp_path / "reconnectd.toml"
    key_file = tmp_path / "octoprint.key"
    if content is not None:
        write(key_file, content)
    text = PRINTER_PORT + '[printer.octoprint]\napi_key_file = "octoprint.key"\n'
    assert problems_of(text, source) == [
        f"{source}: printer[0].octoprint.api_key_file: " + problem.format(file=key_file)
    ]


def test_api_key_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "reconnectd.toml"
    (tmp_path / "keys").mkdir()
    assert problems_of('[octoprint]\napi_key_file = "keys"\n', source) == [
        f'{source}: octoprint.api_key_file: "{tmp_path / "keys"}" is not a regular file'
    ]


# --- valid files ------------------------------------------------------------------


def test_defaults() -> None:
    config = parse_config(PRINTER + 'vendor_id = "0x2C99"\n', SOURCE)
    assert config == Config(
        source=SOURCE,
        octoprint=OctoPrintConfig(),
        printers=(PrinterConfig(name="mk3s", octoprint=OctoPrintConfig(), vendor_id="2c99"),),
    )
    printer = config.printers[0]
    assert (printer.settle, printer.poll, printer.known_boards) == (1.0, 0.0, False)
    assert config.octoprint == OctoPrintConfig(
        url="http://127.0.0.1:5000", api_key=None, api_key_file=None, timeout=5.0
    )
    assert not config.zero_config


def test_every_key_is_read() -> None:
    text = (
        '[octoprint]\nurl = "https://octopi.local/octoprint/"\n'
        f'api_key = "{SECRET}"\ntimeout = 2.5\n'
        '[[printer]]\nname = "mk3s"\nvendor_id = "2c99"\nproduct_id = "0002"\n'
        'serial = "CZPX1017X004XK12345"\nport = "/dev/serial/by-id/usb-Prusa-if00"\n'
        f'usb_path = "{USB_PATH}"\n'
        'baudrate = 115200\nprofile = "_default"\nsettle = 2\npoll = 30\n'
    )
    config = parse_config(text, SOURCE)
    shared = OctoPrintConfig(url="https://octopi.local/octoprint", api_key=SECRET, timeout=2.5)
    assert config.octoprint == shared
    assert config.printers == (
        PrinterConfig(
            name="mk3s",
            octoprint=shared,
            vendor_id="2c99",
            product_id="0002",
            serial="CZPX1017X004XK12345",
            usb_path=USB_PATH,
            port="/dev/serial/by-id/usb-Prusa-if00",
            baudrate=115200,
            profile="_default",
            settle=2.0,
            poll=30.0,
        ),
    )
    assert isinstance(config.printers[0].settle, float)


@pytest.mark.parametrize(
    ("extra", "usb_path"),
    [
        pytest.param("", None, id="absent"),
        pytest.param(f'usb_path = "{USB_PATH}"\n', USB_PATH, id="behind-a-hub"),
        pytest.param(
            'usb_path = "pci-0000:00:14.0-usb-0:2:1.0"\n',
            "pci-0000:00:14.0-usb-0:2:1.0",
            id="root-port",
        ),
        pytest.param(
            'usb_path = "platform-xhci-hcd.0.auto-usb-0:1.1:1.0"\n',
            "platform-xhci-hcd.0.auto-usb-0:1.1:1.0",
            id="raspberry-pi",
        ),
        pytest.param(
            f"usb_path = '{USB_PATH}'\nport = \"/dev/ttyUSB0\"\n",
            USB_PATH,
            id="literal-string-with-port",
        ),
    ],
)
def test_usb_path_is_read_as_written(extra: str, usb_path: str | None) -> None:
    (printer,) = parse_config(PRINTER_CH340 + extra, SOURCE).printers
    assert (printer.vendor_id, printer.product_id) == ("1a86", "7523")
    assert printer.usb_path == usb_path


def test_two_identical_boards_told_apart_by_usb_path() -> None:
    text = (
        f'{PRINTER_CH340}usb_path = "pci-0000:00:14.0-usb-0:1:1.0"\n'
        '[[printer]]\nname = "ender3"\nvendor_id = "1a86"\nproduct_id = "7523"\n'
        'usb_path = "pci-0000:00:14.0-usb-0:2:1.0"\n'
        # An OctoPrint of its own: one instance drives one printer connection.
        '[printer.octoprint]\nurl = "http://127.0.0.1:5001"\n'
    )
    printers = parse_config(text, SOURCE).printers
    assert [(p.name, p.usb_path) for p in printers] == [
        ("mk3s", "pci-0000:00:14.0-usb-0:1:1.0"),
        ("ender3", "pci-0000:00:14.0-usb-0:2:1.0"),
    ]


def test_printer_inherits_octoprint() -> None:
    text = (
        f'[octoprint]\nurl = "http://octopi.local:5000/"\napi_key = "{SECRET}"\ntimeout = 3\n'
        + PRINTER_PORT
    )
    config = parse_config(text, SOURCE)
    assert config.printers[0].octoprint == OctoPrintConfig(
        url="http://octopi.local:5000", api_key=SECRET, timeout=3.0
    )


def test_printer_overrides_octoprint_key_by_key(tmp_path: Path) -> None:
    source = tmp_path / "reconnectd.toml"
    write(tmp_path / "mk3s.key", "PRINTERKEY\n")
    text = (
        f'[octoprint]\nurl = "http://127.0.0.1:5000"\napi_key = "{SECRET}"\ntimeout = 3\n'
        + PRINTER_PORT
        + '[printer.octoprint]\nurl = "http://127.0.0.1:5001"\n'
        + '[[printer]]\nname = "mini"\nport = "/dev/ttyACM1"\n'
        + '[printer.octoprint]\napi_key_file = "mk3s.key"\n'
    )
    config = parse_config(text, source)
    mk3s, mini = config.printers
    assert mk3s.octoprint == OctoPrintConfig(
        url="http://127.0.0.1:5001", api_key=SECRET, timeout=3.0
    )
    # A printer's own key file replaces the shared inline key: not "both set".
    assert mini.octoprint == OctoPrintConfig(
        url="http://127.0.0.1:5000",
        api_key="PRINTERKEY",
        api_key_file=tmp_path / "mk3s.key",
        timeout=3.0,
    )
    assert config.octoprint.api_key == SECRET


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty-file"),
        pytest.param("# nothing but a comment\n", id="comment-only"),
        pytest.param('[octoprint]\nurl = "http://octopi.local"\n', id="octoprint-only"),
        pytest.param("printer = []\n", id="empty-printer-array"),
    ],
)
def test_no_printer_means_known_boards(text: str) -> None:
    config = parse_config(text, SOURCE)
    assert config.zero_config
    octoprint, klipper = config.printers
    assert octoprint == PrinterConfig(name="printer", octoprint=config.octoprint, known_boards=True)
    # Klipper's own USB id belongs to [moonraker] (contract, Klipper printers).
    assert klipper == PrinterConfig(
        name="klipper",
        octoprint=config.octoprint,
        known_boards=True,
        moonraker=MoonrakerConfig(),
    )
    assert config.source == SOURCE


# --- where the file is, and whether it must exist ------------------------------------


@pytest.mark.parametrize(
    ("cli", "environ", "expected"),
    [
        pytest.param(
            "/a.toml", {"RECONNECTD_CONFIG": "/b.toml"}, (Path("/a.toml"), True), id="cli-wins"
        ),
        pytest.param(
            None, {"RECONNECTD_CONFIG": "/b.toml"}, (Path("/b.toml"), True), id="env-next"
        ),
        pytest.param(None, {}, (DEFAULT_CONFIG_PATH, False), id="default-last"),
        pytest.param(
            None, {"RECONNECTD_CONFIG": ""}, (DEFAULT_CONFIG_PATH, False), id="empty-env-unset"
        ),
    ],
)
def test_config_path_order(
    cli: str | None, environ: dict[str, str], expected: tuple[Path, bool]
) -> None:
    assert config_path(cli, environ) == expected


def test_missing_default_file_is_zero_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    config = load_config(None, {})
    assert config == Config(
        source=None,
        octoprint=OctoPrintConfig(),
        printers=(
            PrinterConfig(name="printer", octoprint=OctoPrintConfig(), known_boards=True),
            PrinterConfig(
                name="klipper",
                octoprint=OctoPrintConfig(),
                known_boards=True,
                moonraker=MoonrakerConfig(),
            ),
        ),
    )
    assert config.zero_config


def test_present_default_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = write(tmp_path / "reconnectd.toml", PRINTER_PORT)
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", default)
    assert load_config(None, {}).printers[0].name == "mk3s"


@pytest.mark.parametrize(
    ("use_cli", "origin"),
    [pytest.param(True, "--config", id="cli"), pytest.param(False, "$RECONNECTD_CONFIG", id="env")],
)
def test_missing_named_file_is_an_error(tmp_path: Path, use_cli: bool, origin: str) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        if use_cli:
            load_config(str(missing), {})
        else:
            load_config(None, {"RECONNECTD_CONFIG": str(missing)})
    assert info.value.problems == [f"{missing}: no such file (named by {origin})"]


def test_named_file_wins_over_environment(tmp_path: Path) -> None:
    cli = write(tmp_path / "cli.toml", PRINTER_PORT)
    env = write(tmp_path / "env.toml", "this is not toml")
    assert load_config(str(cli), {"RECONNECTD_CONFIG": str(env)}).source == cli


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path), {})
    assert info.value.problems == [f"{tmp_path}: cannot read the file: Is a directory"]


def test_non_utf8_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "r.toml", b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert info.value.problems == [f"{path}: not UTF-8 text (byte 0xe9 at offset 5)"]


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path / "r.toml", b"\xef\xbb\xbf" + PRINTER_PORT.encode())
    assert load_config(str(path), {}).printers[0].port == "/dev/ttyACM0"


# --- the key stays secret ----------------------------------------------------------


def test_key_never_in_repr_str_or_messages(tmp_path: Path) -> None:
    source = tmp_path / "reconnectd.toml"
    write(tmp_path / "k.key", SECRET)
    config = parse_config(f'[octoprint]\napi_key = "{SECRET}"\n' + PRINTER_PORT, source)
    from_file = parse_config('[octoprint]\napi_key_file = "k.key"\n' + PRINTER_PORT, source)
    for shown in (repr(config), str(config), repr(from_file), str(from_file.printers)):
        assert SECRET not in shown
    assert config.octoprint.api_key == from_file.octoprint.api_key == SECRET

    bad = [
        f'[octoprint]\napi_key = "{SECRET}"\napi_key_file = "k.key"\n',
        f'[octoprint]\napi_key = " {SECRET} x"\n',
        f'[octoprint]\napikey = "{SECRET}"\n',
        f'[octoprint]\napi_key = ["{SECRET}"]\n',
        f'[octoprint]\napi_key = "{SECRET}"\nurl = "ftp://x"\n',
    ]
    for text in bad:
        with pytest.raises(ConfigError) as info:
            parse_config(text, source)
        assert SECRET not in str(info.value)
        assert SECRET not in repr(info.value)


# --- the shipped example ------------------------------------------------------------


def example_text() -> str:
    return resources.files("reconnectd").joinpath("example.toml").read_text(encoding="utf-8")


def test_example_parses_as_zero_config() -> None:
    config = parse_config(example_text(), DEFAULT_CONFIG_PATH)
    assert config.zero_config
    assert config.octoprint == OctoPrintConfig()


def test_example_settings_are_valid_when_uncommented(tmp_path: Path, pki: Pki) -> None:
    # Settings are commented as "#key = value"; uncomment them all (except the
    # inline key and the credential, which exclude the key file) and the file
    # must still be valid.
    write(tmp_path / "octoprint.key", SECRET)
    write(tmp_path / "mk3s.key", "PRINTERKEY")
    shutil.copy(pki.ca, tmp_path / "ca.pem")
    lines = []
    for line in example_text().splitlines():
        if re.match(r"#[\[a-z]", line) and not line.startswith(
            ("#api_key =", "#api_key_credential =")
        ):
            line = line[1:]
        lines.append(line.replace("/etc/reconnectd/", f"{tmp_path}/"))
    config = parse_config("\n".join(lines), tmp_path / "reconnectd.toml", {})
    assert config.octoprint.ca_file == tmp_path / "ca.pem"
    (printer,) = config.printers
    assert printer.name == "mk3s"
    assert (printer.vendor_id, printer.product_id, printer.baudrate) == ("2c99", "0002", 115200)
    assert printer.usb_path == "pci-0000:00:14.0-usb-0:1.2:1.0"
    assert printer.octoprint.url == "http://127.0.0.1:5001"
    assert printer.octoprint.api_key == "PRINTERKEY"
    assert config.octoprint.api_key == SECRET


def test_example_credential_is_valid_when_uncommented(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    write(credentials / "octoprint.key", SECRET)
    lines = [
        line[1:] if line.startswith("#api_key_credential =") else line
        for line in example_text().splitlines()
    ]
    config = parse_config(
        "\n".join(lines), tmp_path / "reconnectd.toml", {"CREDENTIALS_DIRECTORY": str(credentials)}
    )
    assert (config.octoprint.api_key, config.octoprint.api_key_credential) == (
        SECRET,
        "octoprint.key",
    )


def test_example_mentions_every_key() -> None:
    text = example_text()
    keys = [
        *("url", "api_key", "api_key_file", "api_key_credential", "ca_file", "timeout"),
        *(
            "name",
            "vendor_id",
            "product_id",
            "serial",
            "usb_path",
            "port",
            "baudrate",
            "profile",
            "settle",
            "poll",
        ),
    ]
    for key in keys:
        assert re.search(rf"^#?{key} = ", text, re.MULTILINE), key
    assert "[printer.octoprint]" in text and "[[printer]]" in text


# --- nothing but ConfigError, whatever the file holds ----------------------------------

ODD_VALUES = [
    '[1, "a"]',
    "[]",
    "[[1]]",
    "{a = 1}",
    "{}",
    "1979-05-27T07:32:00Z",
    "1979-05-27T07:32:00",
    "1979-05-27",
    "07:32:00",
    "nan",
    "+inf",
    "-inf",
    "1e400",
    "-1e-400",
    "9" * 4000,
    "-99999999999999999999999",
    "0",
    "-1",
    "0.0",
    "true",
    "false",
    '""',
    '" "',
    '"\\u0000"',
    '"\\n"',
    '"x"',
    '"/dev/../x"',
    '"http://[::1"',
    '"http://u:p@"',
    "'/dev/zero'",
]

OCTOPRINT_KEYS = ("url", "api_key", "api_key_file", "api_key_credential", "ca_file", "timeout")

POSITIONS = [
    "top:octoprint",
    "top:printer",
    *(f"octoprint:{key}" for key in OCTOPRINT_KEYS),
    *(
        f"printer:{key}"
        for key in (
            "name",
            "vendor_id",
            "product_id",
            "serial",
            "usb_path",
            "port",
            "baudrate",
            "profile",
            "settle",
            "poll",
            "octoprint",
        )
    ),
    *(f"printer.octoprint:{key}" for key in OCTOPRINT_KEYS),
]


def place(position: str, value: str) -> str:
    where, key = position.split(":")
    if where == "top":
        return f"{key} = {value}\n"
    if where == "octoprint":
        return f"[octoprint]\n{key} = {value}\n"
    if where == "printer":
        name = "" if key == "name" else 'name = "p"\n'
        return f'[[printer]]\n{name}vendor_id = "2c99"\n{key} = {value}\n'.replace(
            'vendor_id = "2c99"\nvendor_id', "vendor_id"
        )
    return f'[[printer]]\nname = "p"\nport = "/dev/ttyACM0"\n[printer.octoprint]\n{key} = {value}\n'


@pytest.mark.parametrize("position", POSITIONS)
def test_odd_values_raise_only_config_error(position: str) -> None:
    for value in ODD_VALUES:
        text = place(position, value)
        try:
            parse_config(text, SOURCE)
        except ConfigError as error:
            assert error.problems, text
            assert all(line.startswith(f"{SOURCE}: ") for line in error.problems), text
            if position.endswith(":api_key") and value.startswith('"') and len(value) > 3:
                assert value.strip('"') not in str(error)


def test_random_documents_raise_only_config_error() -> None:
    rng = random.Random(20240607)
    tokens = [
        "[octoprint]", "[[printer]]", "[printer.octoprint]", "[printer]", "name", "url", "=",
        '"mk3s"', '"2c99"', "vendor_id", "settle", "poll", "1", "-1", "1.5", "nan", "[", "]",
        "{", "}", ",", ".", '"', "'", "\n", "\n", " ", "#", "true", "1979-05-27", "inf", "\\",
        "api_key_file", '"/dev/null"', "port", '"/dev/ttyACM0"', "\x00", "é",
    ]  # fmt: skip
    for _ in range(2000):
        text = "".join(rng.choice(tokens) for _ in range(rng.randint(0, 30)))
        with contextlib.suppress(ConfigError):
            parse_config(text, SOURCE)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param(
            "a = " + "[" * 5000 + "]" * 5000, "arrays or tables are nested too deeply", id="deep"
        ),
        pytest.param(
            "[octoprint]\ntimeout = " + "9" * 5000,
            "an integer has too many digits",
            id="huge-integer",
        ),
    ],
)
def test_pathological_documents(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE)
    assert info.value.problems == [f"{SOURCE}: {problem}"]


def test_large_integer_is_shown_shortened() -> None:
    digits = "9" * 4000
    assert problems_of(f"{PRINTER_PORT}baudrate = 1.5\nsettle = {digits}\n") == [
        f"{SOURCE}: printer[0].baudrate: expected an integer, got 1.5",
        f"{SOURCE}: printer[0].settle: must be at least 0 and at most 600 seconds,"
        f" got {'9' * 20}... (4000 digits)",
    ]


# --- the key from a systemd credential (LoadCredential=) -----------------------------

CREDENTIAL = '[octoprint]\napi_key_credential = "octoprint.key"\n' + PRINTER_PORT


def credentials_env(directory: Path) -> dict[str, str]:
    return {"CREDENTIALS_DIRECTORY": str(directory)}


def test_credential_is_read_from_the_credentials_directory(tmp_path: Path) -> None:
    write(tmp_path / "creds" / "octoprint.key", f"{SECRET}\n")
    (tmp_path / "creds" / "octoprint.key").chmod(0o644)  # systemd's business, not ours
    config = parse_config(CREDENTIAL, SOURCE, credentials_env(tmp_path / "creds"))
    assert config.octoprint == OctoPrintConfig(
        api_key=SECRET, api_key_file=None, api_key_credential="octoprint.key"
    )
    assert config.printers[0].octoprint == config.octoprint
    assert config.warnings == ()
    assert SECRET not in repr(config)


def test_load_config_gives_the_environment_to_the_credential(tmp_path: Path) -> None:
    write(tmp_path / "creds" / "octoprint.key", SECRET)
    path = write(tmp_path / "reconnectd.toml", CREDENTIAL)
    config = load_config(str(path), credentials_env(tmp_path / "creds"))
    assert config.octoprint.api_key == SECRET


@pytest.mark.parametrize("environ", [{}, {"CREDENTIALS_DIRECTORY": ""}], ids=["unset", "empty"])
def test_credential_without_systemd_says_how_to_start_it(environ: dict[str, str]) -> None:
    assert problems_of_env(CREDENTIAL, environ) == [
        f"{SOURCE}: octoprint.api_key_credential: $CREDENTIALS_DIRECTORY is not set:"
        " reconnectd was not started by systemd with LoadCredential=octoprint.key:PATH"
    ]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(
            None,
            'no credential "octoprint.key" in $CREDENTIALS_DIRECTORY ({dir}): add'
            " LoadCredential=octoprint.key:PATH to the service and restart it",
            id="missing",
        ),
        pytest.param("", 'credential "octoprint.key" at "{file}" is empty', id="empty"),
        pytest.param("\n \n", 'credential "octoprint.key" at "{file}" is empty', id="blank"),
        pytest.param(
            "x" * 5000,
            'credential "octoprint.key" at "{file}" is larger than 4096 bytes: not a key file',
            id="huge",
        ),
        pytest.param(
            b"\xff\xfe\x00", 'credential "octoprint.key" at "{file}" is not UTF-8 text', id="binary"
        ),
        pytest.param(
            f"{SECRET} {SECRET}",
            "the key must be a single word with no spaces or line breaks",
            id="two-words",
        ),
    ],
)
def test_credential_problems(tmp_path: Path, content: str | bytes | None, problem: str) -> None:
    directory = tmp_path / "creds"
    directory.mkdir()
    file = directory / "octoprint.key"
    if content is not None:
        write(file, content)
    text = PRINTER_PORT + '[printer.octoprint]\napi_key_credential = "octoprint.key"\n'
    assert problems_of_env(text, credentials_env(directory)) == [
        f"{SOURCE}: printer[0].octoprint.api_key_credential: "
        + problem.format(dir=directory, file=file)
    ]
    if isinstance(content, str) and content.strip():
        assert SECRET not in str(problems_of_env(text, credentials_env(directory)))


def test_credential_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "octoprint.key").mkdir()
    assert problems_of_env(CREDENTIAL, credentials_env(tmp_path)) == [
        f'{SOURCE}: octoprint.api_key_credential: credential "octoprint.key"'
        f' at "{tmp_path / "octoprint.key"}" is not a regular file'
    ]


def test_unreadable_credential_is_refused(tmp_path: Path) -> None:
    file = write(tmp_path / "octoprint.key", SECRET)
    file.chmod(0)
    if os.access(file, os.R_OK):
        pytest.skip("running as root: permissions do not stop us")
    assert problems_of_env(CREDENTIAL, credentials_env(tmp_path)) == [
        f'{SOURCE}: octoprint.api_key_credential: cannot read credential "octoprint.key"'
        f' at "{file}": Permission denied'
    ]


def test_printer_credential_replaces_the_inherited_inline_key(tmp_path: Path) -> None:
    write(tmp_path / "mk3s.key", "PRINTERKEY")
    text = (
        f'[octoprint]\napi_key = "{SECRET}"\n'
        + PRINTER_PORT
        + '[printer.octoprint]\napi_key_credential = "mk3s.key"\n'
    )
    config = parse_config(text, SOURCE, credentials_env(tmp_path))
    assert config.octoprint.api_key == SECRET
    assert config.printers[0].octoprint == OctoPrintConfig(
        api_key="PRINTERKEY", api_key_credential="mk3s.key"
    )


def test_printer_key_file_replaces_the_inherited_credential(tmp_path: Path) -> None:
    write(tmp_path / "creds" / "octoprint.key", SECRET)
    key_file = write(tmp_path / "mk3s.key", "PRINTERKEY")
    key_file.chmod(0o600)
    text = CREDENTIAL + '[printer.octoprint]\napi_key_file = "mk3s.key"\n'
    config = parse_config(text, tmp_path / "r.toml", credentials_env(tmp_path / "creds"))
    assert config.octoprint.api_key_credential == "octoprint.key"
    assert config.printers[0].octoprint == OctoPrintConfig(
        api_key="PRINTERKEY", api_key_file=key_file, api_key_credential=None
    )


def problems_of_env(text: str, environ: dict[str, str], source: Path = SOURCE) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source, environ)
    return info.value.problems


# --- ca_file: the CA of an https OctoPrint ---------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_ca_file_relative_to_config_dir_is_made_absolute(tmp_path: Path, pki: Pki) -> None:
    shutil.copy(pki.ca, write(tmp_path / "etc" / "certs" / "ca.pem", ""))
    text = '[octoprint]\nurl = "https://octopi.local"\nca_file = "certs/ca.pem"\n' + PRINTER_PORT
    config = parse_config(text, tmp_path / "etc" / "reconnectd.toml")
    assert config.octoprint.ca_file == tmp_path / "etc" / "certs" / "ca.pem"
    assert config.printers[0].octoprint.ca_file == config.octoprint.ca_file


def test_printer_ca_file_overrides_the_shared_one(tmp_path: Path, pki: Pki) -> None:
    shutil.copy(pki.ca, tmp_path / "shared.pem")
    shutil.copy(pki.ca, tmp_path / "mk3s.pem")
    text = (
        '[octoprint]\nca_file = "shared.pem"\ntimeout = 3\n'
        + PRINTER_PORT
        + '[printer.octoprint]\nurl = "https://127.0.0.1:5001"\nca_file = "mk3s.pem"\n'
    )
    config = parse_config(text, tmp_path / "reconnectd.toml")
    assert config.octoprint.ca_file == tmp_path / "shared.pem"
    assert config.printers[0].octoprint == OctoPrintConfig(
        url="https://127.0.0.1:5001", timeout=3.0, ca_file=tmp_path / "mk3s.pem"
    )


def test_ca_file_may_be_a_bundle_of_several_cas(tmp_path: Path, pki: Pki) -> None:
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    bundle = pki.ca.read_text() + (system.read_text() if system.exists() else pki.ca.read_text())
    write(tmp_path / "bundle.pem", bundle)
    config = parse_config('[octoprint]\nca_file = "bundle.pem"\n', tmp_path / "r.toml")
    assert config.octoprint.ca_file == tmp_path / "bundle.pem"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(None, 'cannot read "{file}": No such file or directory', id="missing"),
        pytest.param("", NOT_PEM, id="empty"),
        pytest.param("not a certificate\n", NOT_PEM, id="text"),
        pytest.param("DER", NOT_PEM, id="der-instead-of-pem"),
        pytest.param("KEY", NOT_PEM, id="private-key-instead"),
        pytest.param(
            "-----BEGIN CERTIFICATE-----\nbm90IGJhc2U2NA==\n-----END CERTIFICATE-----\n",
            NOT_PEM,
            id="broken-pem",
        ),
    ],
)
def test_ca_file_problems(tmp_path: Path, pki: Pki, content: str | None, problem: str) -> None:
    file = tmp_path / "ca.pem"
    if content == "DER":
        write(file, ssl.PEM_cert_to_DER_cert(pki.ca.read_text()))
    elif content == "KEY":
        shutil.copy(pki.key, file)
    elif content is not None:
        write(file, content)
    text = PRINTER_PORT + '[printer.octoprint]\nca_file = "ca.pem"\n'
    assert problems_of(text, tmp_path / "reconnectd.toml") == [
        f"{tmp_path / 'reconnectd.toml'}: printer[0].octoprint.ca_file: "
        + problem.format(file=file)
    ]


@pytest.mark.parametrize("kind", ["directory", "device"])
def test_ca_file_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    if kind == "directory":
        (tmp_path / "certs").mkdir()
        value, shown = "certs", tmp_path / "certs"
    else:
        value, shown = "/dev/zero", Path("/dev/zero")
    text = f'[octoprint]\nca_file = "{value}"\n'
    assert problems_of(text, tmp_path / "r.toml") == [
        f'{tmp_path / "r.toml"}: octoprint.ca_file: "{shown}" is not a regular file'
    ]


def test_unreadable_ca_file_is_refused(tmp_path: Path, pki: Pki) -> None:
    file = tmp_path / "ca.pem"
    shutil.copy(pki.ca, file)
    file.chmod(0)
    if os.access(file, os.R_OK):
        pytest.skip("running as root: permissions do not stop us")
    assert problems_of('[octoprint]\nca_file = "ca.pem"\n', tmp_path / "r.toml") == [
        f'{tmp_path / "r.toml"}: octoprint.ca_file: cannot read "{file}": Permission denied'
    ]


# --- secrets others can read: warnings, never errors ----------------------------------


def secret_file(path: Path, mode: int, gid: int | None = None) -> os.stat_result:
    write(path, SECRET)
    if gid is not None:
        os.chown(path, -1, gid)
    path.chmod(mode)
    return path.stat()


def as_root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another group")


def test_exposure_rules(tmp_path: Path) -> None:
    """Each rule with a real file's real status; the daemon's ids are the variable."""
    file = tmp_path / "octoprint.key"
    status = secret_file(file, 0o600)
    owner, group = status.st_uid, status.st_gid
    stranger, other_group = owner + 4242, group + 4242
    group_name = grp.getgrgid(group).gr_name
    assert exposure(file, status, owner, group) is None
    assert exposure(file, status, stranger, other_group) is None  # its owner alone

    status = secret_file(file, 0o640)
    assert exposure(file, status, owner, group) is None  # the daemon's own group
    assert exposure(file, status, stranger, group) is None  # root:reconnectd 0640
    assert exposure(file, status, owner, other_group) == (
        f"group {group_name}",
        f"chmod 600 {file}",
    )

    status = secret_file(file, 0o644)
    assert exposure(file, status, owner, other_group) == ("other users", f"chmod 600 {file}")
    assert exposure(file, status, stranger, group) == ("other users", f"chmod 640 {file}")
    assert exposure(file, status, 0, other_group) == ("other users", f"chmod 600 {file}")
    if stranger != 0:
        assert exposure(file, status, stranger, other_group) == (
            "other users",
            f"chgrp {other_group} {file} && chmod 640 {file}",
        )

    status = secret_file(file, 0o604)
    assert exposure(file, status, owner, group) == ("other users", f"chmod 600 {file}")


def test_exposure_quotes_a_path_with_spaces(tmp_path: Path) -> None:
    file = tmp_path / "my keys" / "octoprint.key"
    status = secret_file(file, 0o644)
    assert exposure(file, status, status.st_uid, status.st_gid) == (
        "other users",
        f"chmod 600 '{file}'",
    )


def test_exposure_names_a_group_without_a_name_by_number(tmp_path: Path) -> None:
    as_root_only()
    file = tmp_path / "octoprint.key"
    status = secret_file(file, 0o640, gid=54321)
    assert exposure(file, status, 0, 0) == ("group 54321", f"chmod 600 {file}")


KEY_FILE_CONFIG = '[octoprint]\napi_key_file = "octoprint.key"\n' + PRINTER_PORT


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o660])
def test_key_file_others_cannot_read_earns_no_warning(tmp_path: Path, mode: int) -> None:
    secret_file(tmp_path / "octoprint.key", mode)
    assert parse_config(KEY_FILE_CONFIG, tmp_path / "r.toml").warnings == ()


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o666, 0o444])
def test_world_readable_key_file_is_a_warning(tmp_path: Path, mode: int) -> None:
    file = tmp_path / "octoprint.key"
    secret_file(file, mode)
    config = parse_config(KEY_FILE_CONFIG, tmp_path / "r.toml")
    assert config.octoprint.api_key == SECRET  # a warning: the key is used all the same
    assert config.warnings == (f"{file}: readable by other users; run: chmod 600 {file}",)


def test_key_file_of_another_group_is_a_warning(tmp_path: Path) -> None:
    as_root_only()
    file = tmp_path / "octoprint.key"
    secret_file(file, 0o640, gid=54321)
    assert parse_config(KEY_FILE_CONFIG, tmp_path / "r.toml").warnings == (
        f"{file}: readable by group 54321; run: chmod 600 {file}",
    )


def test_one_key_file_in_two_tables_is_one_warning(tmp_path: Path) -> None:
    file = tmp_path / "octoprint.key"
    secret_file(file, 0o644)
    text = (
        KEY_FILE_CONFIG
        + '[printer.octoprint]\nurl = "http://127.0.0.1:5001"\napi_key_file = "octoprint.key"\n'
    )
    assert len(parse_config(text, tmp_path / "r.toml").warnings) == 1


def test_warnings_stay_out_of_the_errors(tmp_path: Path) -> None:
    secret_file(tmp_path / "octoprint.key", 0o644)
    problems = problems_of(KEY_FILE_CONFIG + "settle = -1\n", tmp_path / "r.toml")
    assert problems == [
        f"{tmp_path / 'r.toml'}: printer[0].settle: must be at least 0 and at most 600 seconds,"
        " got -1"
    ]


@pytest.mark.parametrize(
    ("mode", "warned"), [(0o600, False), (0o640, False), (0o644, True), (0o604, True)]
)
def test_config_file_with_an_inline_key_others_can_read(
    tmp_path: Path, mode: int, warned: bool
) -> None:
    path = write(tmp_path / "reconnectd.toml", f'[octoprint]\napi_key = "{SECRET}"\n')
    path.chmod(mode)
    expected = (
        f"{path}: holds an inline api_key and is readable by other users;"
        f" run: chmod 600 {path} (or move the key to api_key_file)"
    )
    config = load_config(str(path), {})
    assert config.warnings == ((expected,) if warned else ())
    assert all(SECRET not in warning for warning in config.warnings)


def test_config_file_without_an_inline_key_may_be_world_readable(tmp_path: Path) -> None:
    secret_file(tmp_path / "octoprint.key", 0o600)
    path = write(tmp_path / "reconnectd.toml", KEY_FILE_CONFIG)
    path.chmod(0o644)
    assert load_config(str(path), {}).warnings == ()


def test_config_file_and_key_file_both_warned_config_first(tmp_path: Path) -> None:
    key_file = tmp_path / "mk3s.key"
    secret_file(key_file, 0o644)
    path = write(
        tmp_path / "reconnectd.toml",
        f'[octoprint]\napi_key = "{SECRET}"\n'
        + PRINTER_PORT
        + '[printer.octoprint]\napi_key_file = "mk3s.key"\n',
    )
    path.chmod(0o644)
    warnings = load_config(str(path), {}).warnings
    assert [warning.split(":")[0] for warning in warnings] == [str(path), str(key_file)]


def test_check_prints_warnings_and_still_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "octoprint.key"
    secret_file(file, 0o644)
    path = write(tmp_path / "reconnectd.toml", KEY_FILE_CONFIG)
    assert main(["check"], {"RECONNECTD_CONFIG": str(path)}) == 0
    captured = capsys.readouterr()
    assert captured.out == f"config OK: {path}; printers: mk3s\n"
    assert captured.err == f"warning: {file}: readable by other users; run: chmod 600 {file}\n"


def test_the_service_group_may_read_a_secret_whoever_checks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """root:reconnectd 0640, checked by `sudo reconnectd check` (root, group root)."""
    as_root_only()
    file = tmp_path / "octoprint.key"
    status = secret_file(file, 0o640, grp.getgrnam("nogroup").gr_gid)
    monkeypatch.setattr(config_module, "SERVICE_GROUP", "nogroup")
    assert exposure(file, status, 0, 0) is None
    monkeypatch.setattr(config_module, "SERVICE_GROUP", "no-such-group-here")
    assert exposure(file, status, 0, 0) == ("group nogroup", f"chmod 600 {file}")


# --- Klipper printers: [moonraker] and [printer.moonraker] ---------------------------


def test_a_printer_with_a_moonraker_table_is_klippers_and_inherits_moonraker() -> None:
    config = parse_config(
        '[moonraker]\nurl = "http://voron.local:7125"\ntimeout = 3\n\n'
        '[[printer]]\nname = "voron"\nvendor_id = "1d50"\nproduct_id = "614e"\n'
        "[printer.moonraker]\n\n"
        '[[printer]]\nname = "v0"\nvendor_id = "1d50"\nproduct_id = "614e"\nserial = "ABC"\n'
        '[printer.moonraker]\nurl = "http://127.0.0.1:7126"\n\n'
        '[[printer]]\nname = "mk3s"\nvendor_id = "2c99"\n'
        '[printer.octoprint]\nurl = "http://127.0.0.1:5000"\napi_key = "K"\n',
        SOURCE,
    )
    voron, v0, mk3s = config.printers
    assert voron.moonraker == MoonrakerConfig(url="http://voron.local:7125", timeout=3.0)
    assert voron.host is voron.moonraker
    assert v0.moonraker == MoonrakerConfig(url="http://127.0.0.1:7126", timeout=3.0)
    assert mk3s.moonraker is None and mk3s.host is mk3s.octoprint
    assert config.moonraker.url == "http://voron.local:7125"


@pytest.mark.parametrize(
    ("printer", "message"),
    [
        (
            '[printer.octoprint]\nurl = "http://h:5000"\n[printer.moonraker]\n',
            "printer[0]: has both [printer.octoprint] and [printer.moonraker]: a printer is "
            "driven by OctoPrint or by Klipper (through Moonraker), keep one",
        ),
        (
            "baudrate = 250000\n[printer.moonraker]\n",
            "printer[0].baudrate: does not apply to a Klipper printer ([printer.moonraker]): "
            "Klipper's own config sets the serial line; remove baudrate",
        ),
        (
            'profile = "x"\n[printer.moonraker]\n',
            "printer[0].profile: does not apply to a Klipper printer",
        ),
        ("moonraker = 5\n", "printer[0].moonraker: expected a table [printer.moonraker], got 5"),
        (
            '[printer.moonraker]\nurl = "ftp://h"\n',
            "printer[0].moonraker.url: expected an http:// or https:// URL",
        ),
        ("[printer.moonraker]\nport = 7125\n", 'printer[0].moonraker.port: unknown key "port"'),
    ],
)
def test_klipper_printer_mistakes_are_named(printer: str, message: str) -> None:
    text = f'[[printer]]\nname = "voron"\nvendor_id = "1d50"\n{printer}'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, SOURCE)
    assert any(message in problem for problem in caught.value.problems), caught.value.problems


def test_two_klipper_printers_on_one_moonraker_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"both use the Moonraker at http://127\.0\.0\.1:7125"):
        parse_config(
            '[[printer]]\nname = "a"\nvendor_id = "1d50"\n[printer.moonraker]\n'
            '[[printer]]\nname = "b"\nvendor_id = "1d50"\nserial = "B"\n[printer.moonraker]\n',
            SOURCE,
        )


def test_a_klipper_printer_needs_no_octoprint_key_to_pass_check() -> None:
    config = parse_config(
        '[[printer]]\nname = "voron"\nvendor_id = "1d50"\n[printer.moonraker]\n', SOURCE
    )
    assert missing_keys(config, SOURCE) == []


def test_the_timings_of_rules_6_and_7_can_be_set_per_printer() -> None:
    config = parse_config(
        PRINTER_PORT + "stuck_after = 45\nretry_first = 2\nretry_max = 60\n", SOURCE
    )
    (printer,) = config.printers
    assert (printer.stuck_after, printer.retry_first, printer.retry_max) == (45.0, 2.0, 60.0)
    default = parse_config(PRINTER_PORT, SOURCE).printers[0]
    assert (default.stuck_after, default.retry_first, default.retry_max) == (20.0, 5.0, 300.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stuck_after = 0.5\n", "printer[0].stuck_after: must be at least 1 and at most 600"),
        ('retry_first = "5"\n', 'printer[0].retry_first: expected a number of seconds, got "5"'),
        (
            "retry_first = 30\nretry_max = 10\n",
            "printer[0].retry_max: must be at least retry_first (30 s), got 10",
        ),
        (
            "retry_first = 600\n",
            "printer[0].retry_max: must be at least retry_first (600 s), got 300 (the default)",
        ),
    ],
)
def test_timings_out_of_range_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(PRINTER_PORT + text, SOURCE)
    assert any(message in problem for problem in caught.value.problems), caught.value.problems
