"""Routes of the Kite login flow, under /accounts/."""

from django.urls import path

from accounts import views

app_name = "accounts"

urlpatterns = [
    path("<int:pk>/kite/login/", views.kite_login, name="kite_login"),
    path("kite/callback/", views.kite_callback, name="kite_callback"),
]
