"""Routes under /accounts/: the traders' login and logout, the Kite login flow, the positions page."""

from django.contrib.auth import views as auth_views
from django.urls import path

from accounts import views

app_name = "accounts"

urlpatterns = [
    path(
        "login/",
        auth_views.LoginView.as_view(template_name="accounts/login.html", redirect_authenticated_user=True),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("<int:pk>/kite/login/", views.kite_login, name="kite_login"),
    path("kite/callback/", views.kite_callback, name="kite_callback"),
    path("positions/", views.positions_page, name="positions"),
]
