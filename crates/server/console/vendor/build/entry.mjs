// What the console takes from CodeMirror 6: the editor, its basic setup, the Python and
// JavaScript modes. esbuild bundles this into ../codemirror.js.
export { EditorView, keymap } from "@codemirror/view";
export { EditorState, Compartment } from "@codemirror/state";
export { basicSetup } from "codemirror";
export { indentWithTab } from "@codemirror/commands";
export { python } from "@codemirror/lang-python";
export { javascript } from "@codemirror/lang-javascript";
