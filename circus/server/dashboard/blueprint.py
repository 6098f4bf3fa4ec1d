"""The dashboard's one blueprint (views in ``views/`` register on it)."""

from __future__ import annotations

from flask import Blueprint

blueprint = Blueprint("dashboard", __name__, template_folder="templates",
                      static_folder="static", static_url_path="/static/dashboard")
