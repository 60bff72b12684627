// The code editor: CodeMirror 6 (vendored, ../vendor/codemirror.js), mounted in a shadow
// root so that its styles are constructed style sheets (adoptedStyleSheets), which the
// console's Content-Security-Policy allows, rather than <style> elements, which it refuses.

import {
  EditorView, EditorState, Compartment, basicSetup, keymap, indentWithTab, python, javascript,
} from "../vendor/codemirror.js";

const modes = { python: () => python(), javascript: () => javascript() };

export class Editor {
  /** Mounts an editor in `host`, its text labelled `label`; `onRun` is bound to Ctrl+Enter. */
  constructor(host, { label, labelledBy, doc = "", onRun }) {
    const root = host.attachShadow({ mode: "open" });
    this.mode = new Compartment();
    const run = () => { onRun(); return true; };
    this.view = new EditorView({
      root,
      parent: root,
      state: EditorState.create({
        doc,
        extensions: [
          keymap.of([{ key: "Mod-Enter", run }, indentWithTab]),
          basicSetup,
          this.mode.of([]),
          EditorView.contentAttributes.of({
            "aria-label": label,
            ...(labelledBy ? { "aria-labelledby": labelledBy } : {}),
          }),
          EditorView.theme({
            "&": { border: "1px solid #8a8f98", borderRadius: "4px", minHeight: "10em", fontSize: "14px" },
            "&.cm-focused": { outline: "2px solid #1a5fb4", outlineOffset: "1px" },
            ".cm-scroller": { fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace", minHeight: "10em" },
          }),
        ],
      }),
    });
  }

  get text() {
    return this.view.state.doc.toString();
  }

  set text(t) {
    this.view.dispatch({ changes: { from: 0, to: this.view.state.doc.length, insert: t } });
  }

  /** Syntax highlighting for `language` (plain text for the ones without a mode). */
  setLanguage(language) {
    const mode = modes[language];
    this.view.dispatch({ effects: this.mode.reconfigure(mode ? mode() : []) });
  }

  focus() {
    this.view.focus();
  }
}
