"""A real browser through the portal: Debian's headless Chromium, driven by
Selenium, against the real ``serve`` and the real slapd. One user goes the
whole way a person would: log in during the enrollment period, see the days
left, set up (the key read from the page, the code computed from it), confirm,
log out, log in with password and code, reset and confirm a new key; then the
VPN (radclient) takes a code of the key the browser set up.

Screenshots of the main pages are saved to ``test-artifacts/portal/`` (or
``$MFA_PROXY_ARTIFACTS/portal/``); the README uses copies of them (docs/).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest

from tests.integration.proxyproc import ProxyProcess
from tests.integration.slapd import Slapd, user_password
from tests.integration.test_radius_e2e import radclient

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PHONE = (412, 1000)  # CSS pixels: a phone held upright (the page is read on the phone)
USER = "user00701"


def artifacts() -> Path:
    base = Path(os.environ.get("MFA_PROXY_ARTIFACTS", ROOT / "test-artifacts"))
    folder = base / "portal"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def proxy(slapd: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proxy = ProxyProcess.configure(
        tmp_path_factory.mktemp("portal-browser"), slapd,
        clients=[{"name": "vpn", "address": "127.0.0.1/32"}],
        portal={"public_url": "https://mfa.example.org/"},
        overrides={"totp": {"issuer": "Example Corp"}})
    proxy.cli("user", "require", USER, "--days", "7")
    with proxy.running():
        yield proxy


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium with a throw-away profile; nothing reaches beyond loopback."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail("chromium and chromium-driver are not installed (scripts/test installs "
                    "them)")
    profile = tempfile.mkdtemp(prefix="portal-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", f"--window-size={PHONE[0]},{PHONE[1]}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shot(driver: Any, name: str) -> None:
    """The whole page, at the phone's width."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(PHONE[0], max(PHONE[1], int(height) + 140))
    driver.save_screenshot(str(artifacts() / f"{name}.png"))
    driver.set_window_size(*PHONE)


def code_for(key: str, offset_steps: int = 0) -> str:
    return pyotp.TOTP(key).at(time.time() + 30 * offset_steps)


def fill(driver: Any, name: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.NAME, name)
    field.clear()
    field.send_keys(value)


def click(driver: Any, element_id: str) -> None:
    """Click a button that submits its form, and wait for the next page."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    for attempt in range(3):
        # Chromium may still be swapping in the page the last step loaded: a node
        # found a moment ago can be gone ("does not belong to the document").
        try:
            page = driver.find_element(By.TAG_NAME, "html")
            driver.find_element(By.ID, element_id).click()
            break
        except (StaleElementReferenceException, WebDriverException) as e:
            if attempt == 2 or ("does not belong to the document" not in str(e)
                                and not isinstance(e, StaleElementReferenceException)):
                raise
            WebDriverWait(driver, 15).until(
                lambda d: d.execute_script("return document.readyState") == "complete")
    WebDriverWait(driver, 15).until(expected_conditions.staleness_of(page))
    WebDriverWait(driver, 15).until(
        lambda d: d.execute_script("return document.readyState") == "complete")


def by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def has(driver: Any, element_id: str) -> bool:
    from selenium.webdriver.common.by import By

    return bool(driver.find_elements(By.ID, element_id))


def labelled(driver: Any, name: str) -> bool:
    """The input called ``name`` has a <label for=…> (accessibility)."""
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.NAME, name)
    return bool(driver.find_elements(By.CSS_SELECTOR, f"label[for='{field.get_attribute('id')}']"))


def log_in(driver: Any, portal: str, password: str) -> None:
    driver.get(portal)
    assert labelled(driver, "username") and labelled(driver, "password")
    fill(driver, "username", USER)
    fill(driver, "password", password)
    click(driver, "sign-in")


def set_up_and_confirm(driver: Any, screenshot: str | None = None) -> str:
    """On the set-up page: read the key, confirm with a code from it; the key."""
    qr = by_id(driver, "totp-qr")
    assert qr.get_attribute("src").startswith("data:image/png;base64,")
    assert driver.execute_script("return arguments[0].naturalWidth", qr) > 100  # it rendered
    key = re.sub(r"\s+", "", by_id(driver, "totp-secret").text)
    assert re.fullmatch(r"[A-Z2-7]{32}", key), key
    assert labelled(driver, "code")
    if screenshot:
        shot(driver, screenshot)
    fill(driver, "code", code_for(key))
    click(driver, "confirm-setup")
    return key


def test_a_person_sets_up_signs_in_and_resets_in_a_real_browser(
        proxy: ProxyProcess, browser: Any) -> None:
    driver, portal = browser, f"http://127.0.0.1:{proxy.portal_port}/"
    password = user_password(USER)

    # Log in during the enrollment period: the days left.
    driver.get(portal)
    shot(driver, "01-login")
    log_in(driver, portal, password)
    status = by_id(driver, "mfa-status")
    assert status.get_attribute("data-status") == "in_enrollment"
    assert by_id(driver, "days-left").text == "7"
    assert has(driver, "setup-mfa") and has(driver, "logout") and not has(driver, "reset-mfa")
    shot(driver, "02-account-in-enrollment")

    # Set up: the key from the page, a wrong code first (a message, the same key).
    click(driver, "setup-mfa")
    shot(driver, "03-setup")
    key = re.sub(r"\s+", "", by_id(driver, "totp-secret").text)
    fill(driver, "code", "000000" if code_for(key) != "000000" else "111111")
    click(driver, "confirm-setup")
    assert has(driver, "error")
    assert re.sub(r"\s+", "", by_id(driver, "totp-secret").text) == key
    assert set_up_and_confirm(driver, "03b-setup-wrong-code") == key
    assert by_id(driver, "mfa-status").get_attribute("data-status") == "enrolled"
    assert has(driver, "reset-mfa") and not has(driver, "days-left")
    shot(driver, "04-account-enrolled")
    assert proxy.user(USER)["status"] == "enrolled"

    # Log out; log in with password and code.
    click(driver, "logout")
    assert has(driver, "username")
    log_in(driver, portal, password)
    assert labelled(driver, "code")
    shot(driver, "05-code")
    fill(driver, "code", code_for(key, 1))  # the confirming code is used up
    click(driver, "verify")
    assert by_id(driver, "mfa-status").get_attribute("data-status") == "enrolled"

    # Reset: a new key, confirmed the same way; the old one stops working.
    click(driver, "reset-mfa")
    new = set_up_and_confirm(driver)
    assert new != key
    assert by_id(driver, "mfa-status").get_attribute("data-status") == "enrolled"

    # The VPN takes the key the browser set up, and not the old one.
    def vpn(code: str) -> str | None:
        return radclient(proxy.radius_port, proxy.client_secret("vpn"),
                         f'User-Name = "{USER}"\nUser-Password = "{password},{code}"\n'
                         "Message-Authenticator = 0x00\n").code

    assert vpn(code_for(key, 1)) == "Access-Reject"
    assert vpn(code_for(new, 1)) == "Access-Accept"

    # A wrong password: the clear message.
    click(driver, "logout")
    log_in(driver, portal, "not-the-password")
    assert by_id(driver, "message").get_attribute("data-kind") == "bad_credentials"
    shot(driver, "06-bad-credentials")

    # No JavaScript anywhere, and the browser saw the headers it enforces.
    assert driver.execute_script("return document.scripts.length") == 0
    cookies = {c["name"]: c for c in driver.get_cookies()}
    for cookie in cookies.values():
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
