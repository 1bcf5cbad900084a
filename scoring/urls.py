from django.urls import path

from scoring import views

app_name = "scoring"
urlpatterns = [
    path("models/", views.model_list, name="model_list"),
    path("models/<int:pk>/", views.model_detail, name="model_detail"),
    path("models/<int:pk>/promote/", views.model_promote, name="model_promote"),
    path("models/<int:pk>/shadow/", views.model_shadow, name="model_shadow"),
    path("models/sources/<slug:slug>/train/", views.model_train_start, name="model_train"),
]
