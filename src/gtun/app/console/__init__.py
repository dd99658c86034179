"""The web console (`console_listen`): peers of the whole network with their traffic
now, today and this month, one peer's history and source addresses, adding a stock
WireGuard peer with its QR code, the relays, and what doctor finds; and the JSON API
the pages use.

- `web.py`: the aiohttp application, served by the relay in its own event loop
  (`start_console(server)`, started by app/server.py after the control socket and
  closed at unwind); its pages are jinja2 templates (templates/) with their JS and
  CSS in static/, shipped in the wheel.
- `view.py`: the API's rows from the relay's status and the store (pure).
- `auth.py`: the admin's scrypt hash in the store's settings (`gtun console passwd`),
  sessions in memory, CSRF tokens, failed-login limits.
"""

from gtun.app.console.web import RunningConsole, start_console

__all__ = ["RunningConsole", "start_console"]
