from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from reviewapp.core import views as core_views
from reviewapp.core.ratelimit import RateLimitedLoginView

api_patterns = [
    path("", include("reviewapp.ingest.api_urls")),
    path("", include("reviewapp.review.api_urls")),
    path("", include("scoring.api_urls")),
    path("", include("reviewapp.exports.api_urls")),
    path("", include("actions.api_urls")),
    path("", include("reviewapp.observability.api_urls")),
]

urlpatterns = [
    path("", core_views.home, name="home"),
    path("login/", RateLimitedLoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("healthz", core_views.healthz, name="healthz"),
    path("readyz", core_views.readyz, name="readyz"),
    path("metrics", core_views.metrics, name="metrics"),
    path("api/v1/", include(api_patterns)),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("", include("reviewapp.ingest.urls")),
    path("", include("reviewapp.review.urls")),
    path("", include("scoring.urls")),
    path("", include("reviewapp.exports.urls")),
    path("", include("actions.urls")),
    path("", include("reviewapp.observability.urls")),
]
