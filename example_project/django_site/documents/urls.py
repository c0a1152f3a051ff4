from django.urls import path

from example_project.django_site.documents import views

app_name = "documents"
urlpatterns = [
    path("", views.index, name="index"),
    path("documents/<int:doc_id>/scan/", views.scan, name="scan"),
    path("reports/export/", views.export_report, name="export"),
    path("search/", views.search, name="search"),
    path("templates/", views.create_template, name="templates"),
]
