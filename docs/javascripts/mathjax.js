// MathJax configuration for pymdownx.arithmatex (generic mode): arithmatex wraps maths in
// \( \) / \[ \] inside elements of class "arithmatex"; typeset only those.
// The bundle that reads this is vendored (javascripts/vendor/mathjax/tex-svg.js): it holds the TeX
// input with the base and AMS macros and the SVG output with its glyphs, so it loads nothing else.
// The context menu is off: its accessibility explorer is the one part that would fetch code (from a
// CDN), and the site must work offline.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  svg: {
    fontCache: "global"
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
    enableMenu: false
  }
};

// Re-typeset after material's instant navigation swaps the page content.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && MathJax.startup && MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
