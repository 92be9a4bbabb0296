"""HTTP routes of the streaming app."""

from django.urls import re_path

from streaming import views

app_name = "streaming"

urlpatterns = [
    # Both /health and /health/: load balancers probe without following redirects.
    re_path(r"^health/?$", views.health, name="health"),
]

# The live option-chain page (login required).
urlpatterns += [re_path(r"^$", views.chain_page, name="chain")]
