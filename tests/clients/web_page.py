#!/usr/bin/env python3
"""The chat page in headless Chromium (Debian's `chromium` and `chromium-driver`, pip `selenium`):
types a message, waits for the streamed answer, sends a second turn, takes a screenshot.

usage: web_page.py URL SCREENSHOT.png
"""
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

url, shot = sys.argv[1], sys.argv[2]
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,760"]:
    options.add_argument(arg)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.get(url)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: "model:" in d.find_element(By.ID, "model").text)
    box = driver.find_element(By.ID, "input")
    for turn, message in enumerate(["How many legs does a cat have?", "猫有几条腿？"], start=1):
        box.send_keys(message)
        box.send_keys(Keys.ENTER)
        # Each turn adds a user and an assistant message; wait for this turn's reply to finish.
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']")) >= turn)
        replies = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")
        reply = replies[-1].text
        errors = driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert not errors, errors[0].text
        assert reply.strip(), "empty reply"
        print(f"turn {turn}: {message!r} -> {reply!r}")
    users = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.user .content")]
    assert users == ["How many legs does a cat have?", "猫有几条腿？"], users
    time.sleep(0.2)
    driver.save_screenshot(shot)
    # New chat clears the conversation.
    driver.find_element(By.ID, "newChat").click()
    assert not driver.find_elements(By.CSS_SELECTOR, ".msg"), "new chat left messages"
    print("web page: all checks passed; screenshot", shot)
finally:
    driver.quit()
