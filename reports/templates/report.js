/* Enhancements only: the page is complete without this script. */
(function () {
  "use strict";
  var root = document.documentElement;
  root.classList.remove("no-js");
  root.classList.add("js");

  var bar = document.getElementById("filters");
  var onlyProblems = document.getElementById("only-problems");
  var byName = document.getElementById("impl-filter");
  if (bar && onlyProblems && byName) {
    bar.hidden = false;
    var rows = Array.prototype.slice.call(document.querySelectorAll("#matrix-table tbody tr"));
    var articles = Array.prototype.slice.call(document.querySelectorAll("article.discrepancy"));
    var apply = function () {
      var needle = byName.value.trim().toLowerCase();
      var match = function (el) {
        return !needle || (el.getAttribute("data-impl") || "").toLowerCase().indexOf(needle) !== -1;
      };
      rows.forEach(function (tr) {
        var show = match(tr) && (!onlyProblems.checked || tr.getAttribute("data-problems") === "yes");
        tr.hidden = !show;
      });
      articles.forEach(function (a) { a.hidden = !match(a); });
    };
    onlyProblems.addEventListener("change", apply);
    byName.addEventListener("input", apply);
  }

  /* Print everything: open collapsed tables for the printout, close them again afterwards. */
  var opened = [];
  window.addEventListener("beforeprint", function () {
    opened = Array.prototype.filter.call(document.querySelectorAll("details"), function (d) { return !d.open; });
    opened.forEach(function (d) { d.open = true; });
  });
  window.addEventListener("afterprint", function () {
    opened.forEach(function (d) { d.open = false; });
    opened = [];
  });
})();
